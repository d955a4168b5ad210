"""The device state of continuous batching: the engine's batch of B serving rows, each row's KV
cache holding one request at its own length, stepped together one token per call while requests
join and leave.

A request joins by being prefilled alone or with others that join at the same step (`prefill`: a
fresh cache of the rows' length, its prompt right-padded to a bucket, the row's length its own),
then copied into a free row (`insert`). `step` feeds every row its last chosen token at the row's
own position and chooses the next; a row whose request has left is inactive and keeps its state
until the next insert replaces it.
Each row also sums, per MoE layer, the routed gate mass of the tokens it has read, and the part of it
on its adapter's trained experts (the routing monitor's coverage, live).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from esft_jax.eval.sampling import Sampling, next_tokens, sampling_for
from esft_jax.model import (
    ModelConfig,
    Routing,
    forward_cached,
    init_cache,
    segment_positions,
)
from esft_jax.model.transformer import KVCache


class Batch(NamedTuple):
    cache: KVCache  # kv [L, B, S, ...]; segment_ids [B, S]; length [B]
    token_b: jax.Array  # [B] int32: the last chosen token (the next input)
    position_b: jax.Array  # [B] int32: its rotary position
    count_b: jax.Array  # [B] int32: tokens chosen so far (the sampling step of the next one)
    sampling: Sampling  # [B] rows
    hit_lb: jax.Array  # [L, B] float32: routed gate mass on the row's adapter's trained experts
    mass_lb: jax.Array  # [L, B] float32: all routed gate mass of the tokens read


def _gate_mass(
    routing: Routing, trained_ale: jax.Array, sets_b: jax.Array, read_bt: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """([L, B] mass on trained experts, [L, B] all mass) of the tokens with read_bt set."""
    w_lbtk = routing.gate_weights.astype(jnp.float32) * read_bt[None, :, :, None]
    layers = jnp.arange(w_lbtk.shape[0])[:, None, None, None]
    on_trained = trained_ale[sets_b[None, :, None, None], layers, routing.expert_ids]
    return (w_lbtk * on_trained).sum(axis=(2, 3)), w_lbtk.sum(axis=(2, 3))


@functools.partial(jax.jit, static_argnames=("cfg", "rows", "max_len"))
def empty(cfg: ModelConfig, rows: int, max_len: int) -> Batch:
    """`rows` inactive rows of `max_len` tokens each."""
    zeros_b, zeros_lb = jnp.zeros((rows,), jnp.int32), jnp.zeros((cfg.num_moe_layers, rows))
    greedy = sampling_for([0.0] * rows, [1.0] * rows, [0] * rows)
    cache = init_cache(cfg, rows, max_len)
    return Batch(cache, zeros_b, zeros_b, zeros_b, greedy, zeros_lb, zeros_lb)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def prefill(
    params,
    tokens_np: jax.Array,
    segments_np: jax.Array,
    lengths_n: jax.Array,
    sampling: Sampling,
    trained_ale: jax.Array,
    sets_n: jax.Array,
    cfg: ModelConfig,
    max_len: int,
) -> Batch:
    """N joining rows of `max_len` tokens, their first token chosen. Row n's prompt fills its
    first lengths_n[n] tokens (right-padded: segment 0 after it, overwritten as it decodes).
    params: the base with the bank's override sets (AdapterBank.with_overrides); row n reads set
    sets_n[n]."""
    n = tokens_np.shape[0]
    positions = segment_positions(segments_np)
    cache = init_cache(cfg, n, max_len)
    logits, cache, routing = forward_cached(
        params,
        tokens_np,
        cfg,
        cache,
        segment_ids_bt=segments_np,
        positions_bt=positions,
        override_set_b=sets_n,
        with_routing=True,
    )
    hit, mass = _gate_mass(routing, trained_ale, sets_n, segments_np != 0)
    last = jnp.maximum(lengths_n - 1, 0)
    first = next_tokens(logits[jnp.arange(n), last], sampling, jnp.zeros((n,), jnp.int32))
    one = jnp.ones((n,), jnp.int32)
    return Batch(cache._replace(length=lengths_n), first, lengths_n, one, sampling, hit, mass)


@functools.partial(jax.jit, donate_argnames="batch")
def insert(batch: Batch, joining: Batch, rows_n: jax.Array) -> Batch:
    """`batch` with row rows_n[n] replaced by joining row n (`batch` is donated)."""

    def put(axis: int):  # the batch axis: 1 for [L, B, ...] arrays, 0 for the rest
        return lambda whole, part: whole.at[(slice(None),) * axis + (rows_n,)].set(part)

    kv = jax.tree.map(put(1), batch.cache.kv, joining.cache.kv)
    cache = KVCache(kv, *jax.tree.map(put(0), batch.cache[1:], joining.cache[1:]))
    per_row = jax.tree.map(put(0), batch[1:5], joining[1:5])
    return Batch(cache, *per_row, *jax.tree.map(put(1), batch[5:], joining[5:]))


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="batch")
def step(
    params,
    batch: Batch,
    trained_ale: jax.Array,
    sets_b: jax.Array,
    active_b: jax.Array,
    cfg: ModelConfig,
) -> Batch:
    """Every active row reads its last token and chooses the next; inactive rows stay as they are.
    params as prefill's; row b reads set sets_b[b]."""
    logits, cache, routing = forward_cached(
        params,
        batch.token_b[:, None],
        cfg,
        batch.cache,
        segment_ids_bt=jnp.ones_like(batch.token_b)[:, None],
        positions_bt=batch.position_b[:, None],
        override_set_b=sets_b,
        with_routing=True,
    )
    hit, mass = _gate_mass(routing, trained_ale, sets_b, active_b[:, None])
    token = next_tokens(logits[:, 0], batch.sampling, batch.count_b)
    cache = cache._replace(length=jnp.where(active_b, cache.length, batch.cache.length))
    advance = active_b.astype(jnp.int32)
    return Batch(
        cache,
        jnp.where(active_b, token, batch.token_b),
        batch.position_b + advance,
        batch.count_b + advance,
        batch.sampling,
        batch.hit_lb + hit,
        batch.mass_lb + mass,
    )

"""Choosing the next token per batch row: greedy, or sampled with a temperature and nucleus (top-p).

Each row has its own temperature, top-p and key, so rows are independent: a request's tokens depend
only on its logits and seed, whatever else shares its batch. Temperature 0 is greedy (argmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Sampling(NamedTuple):
    temperature_b: jax.Array  # [B] float32; 0 = greedy
    top_p_b: jax.Array  # [B] float32 in (0, 1]
    key_b: jax.Array  # [B] typed PRNG keys, one per row (from its seed)


def sampling_for(
    temperature: Sequence[float], top_p: Sequence[float], seed: Sequence[int]
) -> Sampling:
    """Per-row settings of B rows (padding rows: greedy)."""
    keys = jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seed, np.uint32)))
    return Sampling(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32), keys)


def _nucleus(logits_v: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits with every token outside the smallest set of probability >= top_p set to -inf (the
    most likely token always stays)."""
    probs = jax.nn.softmax(logits_v)
    order = jnp.argsort(-probs)
    before = jnp.cumsum(probs[order]) - probs[order]  # mass of the more likely tokens
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    return jnp.where(keep, logits_v, -jnp.inf)


def next_tokens(logits_bv: jax.Array, sampling: Sampling | None, step: jax.Array) -> jax.Array:
    """[B] int32: argmax where greedy, else a draw from softmax(logits / T) within the nucleus, with
    the row's key folded with `step`, the index of the token being chosen (a scalar, or one per row
    [B] when rows are at different points of their requests)."""
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    if sampling is None:
        return greedy

    def draw(logits_v, temperature, top_p, key, step):
        scaled = logits_v.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
        return jax.random.categorical(jax.random.fold_in(key, step), _nucleus(scaled, top_p))

    step_b = jnp.broadcast_to(step, greedy.shape)
    sampled = jax.vmap(draw)(logits_bv, *sampling, step_b).astype(jnp.int32)
    return jnp.where(sampling.temperature_b > 0, sampled, greedy)

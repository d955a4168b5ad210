"""The MoE decoder: `logits, routing = forward(params, tokens, cfg)`.

A pure function of the parameter pytree (model/params.py): usable under jax.jit / jax.grad, no hidden
state. Dense layers and MoE layers are each stacked; the model's layers run in order, each maximal
run of one kind with `jax.lax.scan` over its slice of the stack (or a Python loop,
`cfg.scan_layers=False`), so a dense prefix (DeepSeek) is two scans and an interleaved pattern
(Qwen's `decoder_sparse_step`) one scan per run. The MoE layers also return every layer's routing,
which profiling consumes directly (no hooks).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from esft_jax.model.attention import LayerCache, write_rows
from esft_jax.model.config import ModelConfig
from esft_jax.model.gqa import gqa
from esft_jax.model.mask import attention_mask
from esft_jax.model.mla import mla
from esft_jax.model.moe import moe_block, swiglu
from esft_jax.model.norm import rms_norm
from esft_jax.model.params import dequantize_linears
from esft_jax.model.rope import rope_cos_sin
from esft_jax.sharding import constrain

_ACT = ("act_batch", None, None)


class Routing(NamedTuple):
    """Routing of every MoE layer (L = num_moe_layers; row l is model layer cfg.moe_layer_ids[l])."""

    expert_ids: jax.Array  # [L, B, T, k] int32
    gate_weights: jax.Array  # [L, B, T, k] float32
    router_scores: jax.Array | None  # [L, B, T, E] float32, only if asked for
    dropped: jax.Array  # [L] int32: assignments dropped by a capacity buffer (0 when dropless)


def segment_positions(segment_ids_bt: jax.Array) -> jax.Array:
    """Position of each token within its segment (restarting at every change of segment id)."""
    t = segment_ids_bt.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t), segment_ids_bt.shape)
    starts = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_bt[:, :1], bool),
            segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1],
        ],
        axis=1,
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class KVCache(NamedTuple):
    """Per layer group ("dense_layers", "moe_layers"), the attention kind's two cached arrays:
    MLA's compressed cache (normed latents [L, B, S, kv_lora_rank], rotated shared keys [L, B, S, rope]),
    GQA's rotated keys and values ([L, B, S, KV, head_dim] each). Under a mesh, split over the batch."""

    kv: dict[str, tuple[jax.Array, jax.Array]]
    segment_ids: jax.Array  # [B, S]: 0 marks padding and unfilled positions
    length: jax.Array  # [B] int32: each row's positions filled so far (its next write offset)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    dt = jnp.dtype(cfg.dtype)
    if cfg.attention == "mla":
        shapes = ((cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,))
    else:
        shapes = ((cfg.kv_heads, cfg.gqa_head_dim),) * 2
    groups = {"dense_layers": len(cfg.dense_layer_ids), "moe_layers": cfg.num_moe_layers}

    def zeros(shape: tuple[int, ...], dtype) -> jax.Array:  # split over the batch like activations
        axes = (None, "act_batch") if len(shape) > 2 else ("act_batch",)
        return constrain(jnp.zeros(shape, dtype), axes + (None,) * (len(shape) - len(axes)))

    kv = {
        g: tuple(zeros((n, batch, max_len, *shape), dt) for shape in shapes)
        for g, n in groups.items()
        if n
    }
    return KVCache(kv, zeros((batch, max_len), jnp.int32), zeros((batch,), jnp.int32))


def layer_runs(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """The model's layers as maximal runs of one kind: (group, first, end) slices of that group's stack."""
    moe = set(cfg.moe_layer_ids)
    runs: list[tuple[str, int, int]] = []
    seen = {"dense_layers": 0, "moe_layers": 0}
    for layer in range(cfg.num_hidden_layers):
        group = "moe_layers" if layer in moe else "dense_layers"
        if runs and runs[-1][0] == group:
            runs[-1] = (group, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((group, seen[group], seen[group] + 1))
        seen[group] += 1
    return runs


def _windows(cfg: ModelConfig) -> dict[str, jax.Array]:
    """Per layer group, each layer's sliding window [L] int32 (0: full attention)."""
    sliding = set(cfg.sliding_window_layers)
    windows = {
        "dense_layers": [
            cfg.sliding_window if layer in sliding else 0 for layer in cfg.dense_layer_ids
        ],
        "moe_layers": [
            cfg.sliding_window if layer in sliding else 0 for layer in cfg.moe_layer_ids
        ],
    }
    return {g: jnp.asarray(w, jnp.int32) for g, w in windows.items() if w}


def forward(
    params: dict[str, Any],
    tokens_bt: jax.Array,
    cfg: ModelConfig,
    *,
    segment_ids_bt: jax.Array | None = None,
    positions_bt: jax.Array | None = None,
    override_set_b: jax.Array | None = None,
    return_router_scores: bool = False,
    return_hidden: bool = False,
) -> tuple[jax.Array, Routing]:
    """tokens [B, T] int -> (logits [B, T, V] float32, Routing).

    segment_ids [B, T]: tokens attend only within their segment; 0 marks padding. Default: all 1.
    positions [B, T]: rotary positions. Default: the position within the segment.
    override_set_b [B] int32: where the MoE layers' expert overrides hold A sets (ids [L, A, S]:
    model/moe.py), the set row b uses. Batch data like the tokens, so one compiled pass serves any
    mix of sets.
    return_hidden: the final normed hidden states [B, T, d] (compute dtype) instead of the logits,
    which are `hidden @ lm_head(params, cfg)`: for a loss that never holds them all (model/loss.py).
    """
    if segment_ids_bt is None:
        segment_ids_bt = jnp.ones(tokens_bt.shape, jnp.int32)
    if positions_bt is None:
        positions_bt = segment_positions(segment_ids_bt)
    x, routing, _ = _decoder(
        params, tokens_bt, cfg, segment_ids_bt, positions_bt, override_set_b, return_router_scores
    )
    return (x if return_hidden else _logits(x, lm_head(params, cfg))), routing


def lm_head(params: dict[str, Any], cfg: ModelConfig) -> jax.Array:
    """The output projection [d, V] in the compute dtype: the embedding's transpose when tied."""
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return head.astype(cfg.dtype)


def _logits(x_btd: jax.Array, head_dv: jax.Array) -> jax.Array:
    logits = jnp.einsum("btd,dv->btv", x_btd, head_dv, preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", None, "act_vocab"))


def forward_cached(
    params: dict[str, Any],
    tokens_bt: jax.Array,
    cfg: ModelConfig,
    cache: KVCache,
    *,
    segment_ids_bt: jax.Array,
    positions_bt: jax.Array,
    override_set_b: jax.Array | None = None,
    with_routing: bool = False,
) -> tuple[jax.Array, KVCache] | tuple[jax.Array, KVCache, Routing]:
    """Append row b's T tokens to the cache (at its positions length[b] .. length[b] + T) and
    return their logits (and, with_routing, their Routing). Each token attends to the filled
    positions of its own segment up to itself. override_set_b: as forward's."""
    x, routing, cache = _decoder(
        params, tokens_bt, cfg, segment_ids_bt, positions_bt, override_set_b, False, cache
    )
    logits = _logits(x, lm_head(params, cfg))
    return (logits, cache, routing) if with_routing else (logits, cache)


def _loop_layers(body: Callable, x: jax.Array, xs: Any) -> tuple[jax.Array, Any]:
    """lax.scan's contract as a Python loop: one `unstack` hands out every layer's slice (its transpose,
    one `stack`, gathers the gradients) instead of a dynamic slice of the stacked weights, a dynamic
    update of stacked residuals and gradients, and zero-filled stacks for both, in every step."""
    leaves, treedef = jax.tree.flatten(xs)
    columns = [jnp.unstack(a) for a in leaves]
    ys = []
    for i in range(leaves[0].shape[0]):
        x, y = body(x, treedef.unflatten([c[i] for c in columns]))
        ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _concat(trees: list[Any]) -> Any:
    return trees[0] if len(trees) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *trees)


def _decoder(
    params,
    tokens_bt,
    cfg: ModelConfig,
    segment_ids_bt,
    positions_bt,
    override_set_b,
    return_router_scores: bool,
    cache: KVCache | None = None,
):
    dt = jnp.dtype(cfg.dtype)
    cos, sin = rope_cos_sin(positions_bt, cfg)
    eps = cfg.rms_norm_eps
    t = tokens_bt.shape[1]
    if cache is None:
        key_segments, offset = segment_ids_bt, 0
    else:
        key_segments = write_rows(cache.segment_ids, segment_ids_bt, cache.length)
        offset = cache.length
    mask = attention_mask(segment_ids_bt, key_segments, offset)
    attention = mla if cfg.attention == "mla" else gqa

    def attend(x, kv, p, window, layer):
        layer_cache = None if kv is None else LayerCache(*kv, layer, cache.length)
        layer_mask = mask if window is None else mask._replace(window=window)
        out, layer_cache = attention(
            p["attn"], rms_norm(x, p["attn_norm"], eps), cos, sin, layer_mask, cfg, layer_cache
        )
        return x + out, (None if layer_cache is None else layer_cache[:2])

    # carry: the residual stream and the group's whole KV cache (written in place); xs: one layer's
    # params, window and index in its group
    # (FP8 linears, cfg.linear_fp8: dequantised here, one layer's at a time)
    def dense_layer(carry, xs):
        p, *rest = xs
        p = dequantize_linears(p, cfg)
        x, kv = attend(*carry, p, *rest)
        x = x + swiglu(rms_norm(x, p["mlp_norm"], eps), p["mlp"])
        return (constrain(x, _ACT), kv), None

    def moe_layer(carry, xs):
        p, *rest = xs
        p = dequantize_linears(p, cfg)
        x, kv = attend(*carry, p, *rest)
        out = moe_block(p["moe"], rms_norm(x, p["mlp_norm"], eps), cfg, override_set_b)
        r = out.routing
        routing = Routing(
            r.expert_ids, r.weights, r.scores if return_router_scores else None, out.dropped
        )
        return (constrain(x + out.y_btd, _ACT), kv), routing

    if cfg.remat:  # keep only each layer's input for the backward pass
        dense_layer, moe_layer = jax.checkpoint(dense_layer), jax.checkpoint(moe_layer)

    windows = _windows(cfg) if cfg.sliding_window_layers else {}
    x = constrain(params["embed"][tokens_bt].astype(dt), _ACT)
    kv = {} if cache is None else dict(cache.kv)
    layers = jax.lax.scan if cfg.scan_layers else _loop_layers
    routings = []
    for group, first, end in layer_runs(cfg):
        take = operator.itemgetter(slice(first, end))  # one run's slice of a stack
        xs = (
            jax.tree.map(take, params[group]),
            windows[group][first:end] if windows else None,
            jnp.arange(first, end, dtype=jnp.int32),
        )
        body = dense_layer if group == "dense_layers" else moe_layer
        (x, kv[group]), routing = layers(body, (x, kv.get(group)), xs)
        if group == "moe_layers":
            routings.append(routing)
    if routings:
        routing = _concat(routings)
    else:
        b, k = tokens_bt.shape[0], cfg.num_experts_per_tok
        routing = Routing(
            jnp.zeros((0, b, t, k), jnp.int32),
            jnp.zeros((0, b, t, k)),
            None,
            jnp.zeros((0,), jnp.int32),
        )
    x = rms_norm(x, params["final_norm"], eps)
    if cache is not None:
        cache = KVCache(kv, key_segments, cache.length + t)
    return x, routing, cache

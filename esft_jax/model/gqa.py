"""Grouped-query attention (Qwen-MoE, OLMoE, Mixtral, GLM-4-MoE, gpt-oss).

H query heads share KV key/value heads in groups of H / KV. Options (ModelConfig): biases on the
q/k/v projections and on o; RMS QK-norm per head ("head", before rotation) or over the whole q/k
projection ("full", OLMoE); clamping of q/k/v (OLMoE's clip_qkv, after the norm); partial rotary
(the first `rotary_dim` of each head, halves rotated as a pair); learned attention sinks. The
score scale is head_dim ** -0.5.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from esft_jax.model.attention import LayerCache, attend
from esft_jax.model.config import ModelConfig
from esft_jax.model.mask import AttentionMask
from esft_jax.model.norm import rms_norm
from esft_jax.model.rope import apply_rope
from esft_jax.sharding import constrain


def _project(x_btd: jax.Array, p: dict[str, Any], name: str, cfg: ModelConfig) -> jax.Array:
    """x [B, T, d] -> [B, T, heads, hd]: projection, bias, QK-norm, clamp (OLMoE clamps the normed q/k)."""
    dt = x_btd.dtype
    y = jnp.einsum("btd,dhk->bthk", x_btd, p[name].astype(dt))
    if cfg.qkv_bias:
        y = y + p[f"{name}_bias"].astype(dt)
    if name != "v" and cfg.qk_norm == "head":
        y = rms_norm(y, p[f"{name}_norm"], cfg.rms_norm_eps)
    elif name != "v" and cfg.qk_norm == "full":
        b, t, h, k = y.shape
        y = rms_norm(
            y.reshape(b, t, h * k), p[f"{name}_norm"].reshape(-1), cfg.rms_norm_eps
        ).reshape(y.shape)
    if cfg.clip_qkv is not None:
        y = jnp.clip(y, -cfg.clip_qkv, cfg.clip_qkv)
    return y


def _rotate(
    x_bthk: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array, cfg: ModelConfig
) -> jax.Array:
    r = cfg.rotary_dim
    rotated = apply_rope(x_bthk[..., :r], cos_btr, sin_btr, cfg.rope_interleave)
    return (
        rotated if r == x_bthk.shape[-1] else jnp.concatenate([rotated, x_bthk[..., r:]], axis=-1)
    )


def gqa(
    p: dict[str, Any],
    x_btd: jax.Array,
    cos_btr: jax.Array,
    sin_btr: jax.Array,
    mask: AttentionMask,
    cfg: ModelConfig,
    cache: LayerCache | None = None,
) -> tuple[jax.Array, LayerCache | None]:
    """x [B, T, d] (already normed) -> (output [B, T, d], the cache written).

    With a cache (rotated keys and values of S positions), row b's keys and values are written at its
    offset and the queries attend over all S positions.
    """
    dt = x_btd.dtype
    q = _rotate(_project(x_btd, p, "q", cfg), cos_btr, sin_btr, cfg)
    k = _rotate(_project(x_btd, p, "k", cfg), cos_btr, sin_btr, cfg)
    v = _project(x_btd, p, "v", cfg)
    q = constrain(q, ("act_batch", None, "act_heads", None))
    if cache is not None:
        cache = cache.write(k, v)
        k, v = cache.read()
    out_bthk = attend(q, k, v, mask, q.shape[-1] ** -0.5, cfg, p.get("sinks"))
    out = jnp.einsum("bthk,hkd->btd", out_bthk, p["o"].astype(dt))
    if cfg.o_bias:
        out = out + p["o_bias"].astype(dt)
    return out, cache

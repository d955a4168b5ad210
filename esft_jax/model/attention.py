"""Multi-head latent attention (MLA), DeepSeek-V2/V3.

Queries come from x directly (`q`) or through a low-rank bottleneck (`q_a` -> RMSNorm -> `q_b`).
Keys and values come from a shared latent c = RMSNorm(x @ kv_a[:, :kv_lora_rank]) expanded per head
by `kv_b`; a single rotary key slice k_pe = x @ kv_a[:, kv_lora_rank:] is shared by all heads.
Each head's score is q_nope . k_nope + q_pe . k_pe, times `rope.softmax_scale`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from esft_jax.model.config import ModelConfig
from esft_jax.model.norm import rms_norm
from esft_jax.model.rope import apply_rope, softmax_scale
from esft_jax.sharding import constrain

_MASKED = -1e30  # finite, so a fully masked (padding) row gives a uniform row, not NaN


def attention_mask(
    query_segments_bt: jax.Array, key_segments_bs: jax.Array, query_offset: jax.Array | int
) -> jax.Array:
    """[B, 1, T, S] bool: causal, within one segment, never onto padding (segment id 0).

    Without a cache the keys are the queries themselves (S = T, offset 0). With a KV cache they are
    its S slots and row b's queries sit at slots offset .. offset + T - 1, the offset a scalar or
    one per row [B] (continuous batching: every row at its own length).
    """
    t, s = query_segments_bt.shape[1], key_segments_bs.shape[1]
    query_bt1 = _offset_b11(query_offset) + jnp.arange(t)[None, :, None]
    causal = jnp.arange(s)[None, None, :] <= query_bt1
    same = query_segments_bt[:, :, None] == key_segments_bs[:, None, :]
    not_pad = (key_segments_bs != 0)[:, None, :]
    return (causal & same & not_pad)[:, None]


def within_window(
    mask_b1ts: jax.Array, query_offset: jax.Array | int, window: jax.Array
) -> jax.Array:
    """The mask restricted to keys fewer than `window` slots behind their query (window 0: no limit).
    Slots are positions in the row (or the cache; queries from query_offset on, as in
    `attention_mask`), so packed segments keep their own windows."""
    t, s = mask_b1ts.shape[-2:]
    behind_bts = (
        _offset_b11(query_offset) + jnp.arange(t)[None, :, None] - jnp.arange(s)[None, None, :]
    )
    return mask_b1ts & (behind_bts < jnp.where(window > 0, window, s + 1))[:, None]


def _offset_b11(query_offset: jax.Array | int) -> jax.Array:
    return jnp.reshape(jnp.asarray(query_offset), (-1, 1, 1))


def write_rows(cached_bs: jax.Array, new_bt: jax.Array, offset_b: jax.Array) -> jax.Array:
    """cached [B, S, ...] with row b's new [T, ...] written at slots offset_b[b] .. + T - 1."""

    def write(cached, new, offset):
        return jax.lax.dynamic_update_slice_in_dim(cached, new.astype(cached.dtype), offset, 0)

    return jax.vmap(write)(cached_bs, new_bt, offset_b)


def softmax_attention(
    scores_bhts: jax.Array,
    mask_b1ts: jax.Array,
    v_bshv: jax.Array,
    sinks_h: jax.Array | None = None,
) -> jax.Array:
    """softmax(scores) @ v over the unmasked keys -> [B, T, H, v]. scores are float32 and already scaled.

    Sinks (gpt-oss): a per-head logit that joins every row's softmax and takes its share of the
    probability mass, but contributes no value.
    """
    scores = jnp.where(mask_b1ts, scores_bhts, _MASKED)
    if sinks_h is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        sink = jnp.broadcast_to(
            sinks_h.astype(jnp.float32)[None, :, None, None], (*scores.shape[:-1], 1)
        )
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    return jnp.einsum("bhts,bshv->bthv", probs.astype(v_bshv.dtype), v_bshv)


LayerCache = tuple[
    jax.Array, jax.Array, jax.Array
]  # the two cached arrays of one layer, each row's write offset [B]


def mla(
    p: dict[str, Any],
    x_btd: jax.Array,
    cos_btr: jax.Array,
    sin_btr: jax.Array,
    mask_b1ts: jax.Array,
    cfg: ModelConfig,
    cache: LayerCache | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """x [B, T, d] (already normed) -> (attention output [B, T, d], (latent, k_pe) of the keys).

    Without a cache the keys are x's own tokens (mask [B, 1, T, T]). With MLA's compressed cache
    (latents and rotated shared keys of S positions), row b's latents are written at its offset and the
    queries attend over all S cached positions (mask [B, 1, T, S]).
    """
    dt, eps = x_btd.dtype, 1e-6  # the reference builds q_a/kv_a norms with the default eps
    nope = cfg.qk_nope_head_dim

    if cfg.q_lora_rank is None:
        q_bthk = jnp.einsum("btd,dhk->bthk", x_btd, p["q"].astype(dt))
    else:
        q_lat = rms_norm(x_btd @ p["q_a"].astype(dt), p["q_a_norm"], eps)
        q_bthk = jnp.einsum("btr,rhk->bthk", q_lat, p["q_b"].astype(dt))
    q_nope, q_pe = q_bthk[..., :nope], q_bthk[..., nope:]

    kv_a = x_btd @ p["kv_a"].astype(dt)
    c_btr = rms_norm(kv_a[..., : cfg.kv_lora_rank], p["kv_a_norm"], eps)
    k_pe = kv_a[..., cfg.kv_lora_rank :][:, :, None, :]  # [B, T, 1, rope]: one head, shared
    q_nope = constrain(q_nope, ("act_batch", None, "act_heads", None))

    q_pe = apply_rope(q_pe, cos_btr, sin_btr, cfg.rope_interleave)
    k_pe = apply_rope(k_pe, cos_btr, sin_btr, cfg.rope_interleave)[:, :, 0]
    if cache is not None:
        latent, cached_pe, offset_b = cache
        c_btr, k_pe = write_rows(latent, c_btr, offset_b), write_rows(cached_pe, k_pe, offset_b)

    kv_bshk = jnp.einsum("bsr,rhk->bshk", c_btr.astype(dt), p["kv_b"].astype(dt))
    k_nope, v_bshv = kv_bshk[..., :nope], kv_bshk[..., nope:]
    scores = jnp.einsum(
        "bthk,bshk->bhts", q_nope, k_nope, preferred_element_type=jnp.float32
    ) + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe.astype(dt), preferred_element_type=jnp.float32)
    out_bthv = softmax_attention(scores * softmax_scale(cfg), mask_b1ts, v_bshv)
    return jnp.einsum("bthv,hvd->btd", out_bthv, p["o"].astype(dt)), (c_btr, k_pe)

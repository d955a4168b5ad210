"""Multi-head latent attention (MLA), DeepSeek-V2/V3.

Queries come from x directly (`q`) or through a low-rank bottleneck (`q_a` -> RMSNorm -> `q_b`).
Keys and values come from a shared latent c = RMSNorm(x @ kv_a[:, :kv_lora_rank]) expanded per head
by `kv_b`; a single rotary key slice k_pe = x @ kv_a[:, kv_lora_rank:] is shared by all heads.
Each head's score is q_nope . k_nope + q_pe . k_pe, times `rope.softmax_scale`.

Also the attention core both attention kinds share: the mask (segments, causality, the KV cache's
slots, sliding windows) and softmax(scores) @ v two ways, chosen by `cfg.attention_impl`:
`softmax_attention` ("reference": materialised float32 scores [B, H, T, S]) and
`dot_product_attention` ("dot_product": jax.nn.dot_product_attention, with JAX's choice of kernel).
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


def dot_product_attention(
    q_bthk: jax.Array,
    k_bsgk: jax.Array,
    v_bsgv: jax.Array,
    mask_b1ts: jax.Array,
    scale: float,
    sinks_h: jax.Array | None = None,
) -> jax.Array:
    """softmax_attention's output [B, T, H, v] through jax.nn.dot_product_attention with JAX's
    choice of kernel (implementation=None). In JAX 0.10 that is XLA's on every backend, which
    materialises the scores too; cuDNN's flash kernel (implementation="cudnn") is not chosen here:
    it takes bf16/fp16 only, head dims up to 256 (Hopper), even lengths with a bias, and turns
    the boolean mask into a [B, 1, T, S] bias.

    The G key/value heads (G divides H) each serve H / G consecutive query heads, as
    softmax_attention's repeated ones, without being repeated. What the function cannot take is
    rewritten exactly: v's head dim differing from q/k's (MLA) -> the narrower side padded with
    zeros (zeros add nothing to a score; the padded output columns are zero and cut off); sinks ->
    one more key slot, its key and value zero, never masked, whose logit is the sink (a bias
    [1, H, 1, S + 1]). Masks (segments, causality, cache slots, sliding windows) come in as the
    boolean mask, so a per-layer window may be traced (the layer scan's).
    """
    vd, width = v_bsgv.shape[-1], max(q_bthk.shape[-1], v_bsgv.shape[-1])
    widen = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])  # noqa: E731
    q_bthk, k_bsgk, v_bsgv = widen(q_bthk), widen(k_bsgk), widen(v_bsgv)
    bias = None
    if sinks_h is not None:
        slot = [(0, 0), (0, 1), (0, 0), (0, 0)]
        k_bsgk, v_bsgv = jnp.pad(k_bsgk, slot), jnp.pad(v_bsgv, slot)
        mask_b1ts = jnp.pad(mask_b1ts, [(0, 0)] * 3 + [(0, 1)], constant_values=True)
        s = mask_b1ts.shape[-1]
        bias = jnp.zeros((1, q_bthk.shape[2], 1, s), jnp.float32)
        bias = bias.at[..., -1].set(sinks_h.astype(jnp.float32)[None, :, None])
    out = jax.nn.dot_product_attention(
        q_bthk,
        k_bsgk.astype(q_bthk.dtype),
        v_bsgv.astype(q_bthk.dtype),
        bias=bias,
        mask=mask_b1ts,
        scale=scale,
    )
    return out[..., :vd]


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
    if cfg.attention_impl == "reference":
        scores = jnp.einsum(
            "bthk,bshk->bhts", q_nope, k_nope, preferred_element_type=jnp.float32
        ) + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe.astype(dt), preferred_element_type=jnp.float32)
        out_bthv = softmax_attention(scores * softmax_scale(cfg), mask_b1ts, v_bshv)
    else:  # every head's key: its own k_nope and the shared k_pe
        k_pe_bshr = jnp.broadcast_to(
            k_pe.astype(dt)[:, :, None], (*k_nope.shape[:3], k_pe.shape[-1])
        )
        q_bthk = jnp.concatenate([q_nope, q_pe], -1)
        k_bshk = jnp.concatenate([k_nope, k_pe_bshr], -1)
        out_bthv = dot_product_attention(q_bthk, k_bshk, v_bshv, mask_b1ts, softmax_scale(cfg))
    return jnp.einsum("bthv,hvd->btd", out_bthv, p["o"].astype(dt)), (c_btr, k_pe)

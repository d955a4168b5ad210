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

from esft_jax.model.attention import LayerCache, attend, softmax_attention
from esft_jax.model.config import ModelConfig
from esft_jax.model.mask import AttentionMask, dense
from esft_jax.model.norm import rms_norm
from esft_jax.model.rope import apply_rope, softmax_scale
from esft_jax.sharding import constrain


def mla(
    p: dict[str, Any],
    x_btd: jax.Array,
    cos_btr: jax.Array,
    sin_btr: jax.Array,
    mask: AttentionMask,
    cfg: ModelConfig,
    cache: LayerCache | None = None,
) -> tuple[jax.Array, LayerCache | None]:
    """x [B, T, d] (already normed) -> (attention output [B, T, d], the cache written).

    Without a cache the keys are x's own tokens (S = T). With MLA's compressed cache (latents and
    rotated shared keys of S positions), row b's latents are written at its offset and the queries
    attend over all S cached positions.
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
        cache = cache.write(c_btr, k_pe)
        c_btr, k_pe = cache.read()

    kv_bshk = jnp.einsum("bsr,rhk->bshk", c_btr.astype(dt), p["kv_b"].astype(dt))
    k_nope, v_bshv = kv_bshk[..., :nope], kv_bshk[..., nope:]
    if cfg.attention_impl == "reference":  # the shared k_pe scored once, not per head
        scores = jnp.einsum(
            "bthk,bshk->bhts", q_nope, k_nope, preferred_element_type=jnp.float32
        ) + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe.astype(dt), preferred_element_type=jnp.float32)
        out_bthv = softmax_attention(scores * softmax_scale(cfg), dense(mask), v_bshv)
    else:  # every head's key: its own k_nope and the shared k_pe
        k_pe_bshr = jnp.broadcast_to(
            k_pe.astype(dt)[:, :, None], (*k_nope.shape[:3], k_pe.shape[-1])
        )
        q_bthk = jnp.concatenate([q_nope, q_pe], -1)
        k_bshk = jnp.concatenate([k_nope, k_pe_bshr], -1)
        out_bthv = attend(q_bthk, k_bshk, v_bshv, mask, softmax_scale(cfg), cfg)
    return jnp.einsum("bthv,hvd->btd", out_bthv, p["o"].astype(dt)), cache

"""Rotary position embeddings, plain and YaRN-scaled.

Only `cfg.rotary_dim` dims of each query/key head are rotated (MLA: its rope slice; GQA: all of the
head or its first `partial_rotary_factor`). YaRN (DeepSeek-V2-Lite uses
factor 40) blends interpolated and extrapolated frequencies, scales cos/sin by an attention factor,
and changes the softmax scale by mscale(factor, mscale_all_dim)**2.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.model.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_freq_and_attention_factor(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rope_dim // 2] (float32) and the cos/sin scale."""
    dim, base = cfg.rotary_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if cfg.rope_type == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor = cfg.rope_factor
    original_max = cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings
    if cfg.rope_attention_factor is not None:
        attention_factor = cfg.rope_attention_factor
    elif cfg.rope_mscale and cfg.rope_mscale_all_dim:
        attention_factor = _yarn_mscale(factor, cfg.rope_mscale) / _yarn_mscale(
            factor, cfg.rope_mscale_all_dim
        )
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1.0 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq.astype(np.float32), float(attention_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)**2."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope_type == "yarn" and cfg.rope_mscale_all_dim:
        scale *= _yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
    return scale


def rope_cos_sin(positions_bt: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rope_dim // 2] in float32, already scaled by the attention factor."""
    inv_freq, attention_factor = inv_freq_and_attention_factor(cfg)
    angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(
    x_bthr: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array, interleave: bool
) -> jax.Array:
    """Rotate x [B, T, H, r] by position; pairs are (2i, 2i+1) if interleave else (i, i + r/2).

    Rotated in float32, returned in x's dtype. The output keeps the input's pair layout; queries and
    keys share it, so their dot products equal the reference's whatever layout it writes.
    """
    x = x_bthr.astype(jnp.float32)
    cos, sin = cos_btr[:, :, None, :], sin_btr[:, :, None, :]
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        x1, x2 = jnp.split(x, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthr.dtype)

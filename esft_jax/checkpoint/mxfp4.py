"""MXFP4 expert weights, as gpt-oss checkpoints on the Hugging Face Hub store them.

A routed-expert tensor `<base>` (e.g. `model.layers.0.mlp.experts.gate_up_proj`) is stored as two
uint8 tensors:

- `<base>_blocks` [E, out, in/32, 16]: each byte packs two FP4 (E2M1) codes, the low nibble holding
  the even-indexed value of a pair, the high nibble the odd one; 16 bytes = one block of 32 values.
- `<base>_scales` [E, out, in/32]: one E8M0 exponent per block, biased by 127 (value = 2^(s - 127)).

`dequantize` returns [E, in, out] (gate_up: [E, d, 2f], down: [E, f, d]), the layout of
transformers' `GptOssExperts` parameters: the file rows are output features, and the result is
transposed so that `x @ w[e]` applies expert e. It matches transformers' `convert_moe_packed_tensors`
bit for bit (an exact ldexp of the FP4 value; bf16 is the float32 result rounded).
"""

from __future__ import annotations

from collections.abc import Collection

import jax.numpy as jnp
import numpy as np

from esft_jax.model import quant

BLOCK = quant.Mxfp4.block  # values per scale
SCALE_BIAS = quant.E8M0_BIAS
FP4_MAGNITUDES = np.array(quant.FP4_MAGNITUDES, np.float32)
FP4_VALUES = np.array(quant.FP4_VALUES, np.float32)
# byte -> (value of its low nibble, value of its high nibble): one lookup decodes both.
_BYTE_PAIRS = np.stack(
    [FP4_VALUES[np.arange(256) & 0x0F], FP4_VALUES[np.arange(256) >> 4]], axis=-1
)


def packed_names(base: str) -> tuple[str, str]:
    """(blocks, scales): the two file tensor names that hold MXFP4 tensor `base`."""
    return f"{base}_blocks", f"{base}_scales"


def is_mxfp4(names: Collection[str], base: str) -> bool:
    """Whether the file tensor `names` hold `base` in MXFP4 form (both packed tensors present)."""
    return all(n in names for n in packed_names(base))


def _dequantize_rows(
    blocks_ergb: np.ndarray, scales_erg: np.ndarray, compute: np.dtype
) -> np.ndarray:
    """[e, R, G, 16] bytes and [e, R, G] exponents -> values [e, R, G*32] in `compute` dtype."""
    # [e, R, G, 16, 2]: low nibble first
    values = np.take(_BYTE_PAIRS.astype(compute), blocks_ergb, axis=0)
    exps = scales_erg.astype(np.int32)[..., None, None] - SCALE_BIAS
    with np.errstate(over="ignore"):  # exponent 128 overflows to inf, as in transformers
        np.ldexp(values, exps, out=values)
    return values.reshape(*scales_erg.shape[:2], -1)


def dequantize(
    blocks: np.ndarray, scales: np.ndarray, dtype=np.float32, *, chunk_values: int = 1 << 24
) -> np.ndarray:
    """blocks [E, out, G, 16] uint8, scales [E, out, G] uint8 -> weights [E, in=G*32, out] in `dtype`.

    Experts are decoded a few at a time (about `chunk_values` values each, at least one expert) so the
    float32 temporaries stay small next to the output (gpt-oss-20b gate_up: 32 x 5760 x 2880 per layer).
    Values are computed in float32 (float64 if asked for) and then cast, so bf16 = float32 rounded.
    """
    if blocks.ndim != 4 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} are not "
            f"[E, out, G, {BLOCK // 2}] and [E, out, G]"
        )
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(
            f"MXFP4 blocks and scales must be uint8, not {blocks.dtype} and {scales.dtype}"
        )
    n_exp, n_out, n_groups, _ = blocks.shape
    compute = np.promote_types(dtype, np.float32)
    out_eio = np.empty((n_exp, n_groups * BLOCK, n_out), dtype)
    step = max(1, chunk_values // max(1, n_out * n_groups * BLOCK))
    for e0 in range(0, n_exp, step):
        rows_eoi = _dequantize_rows(blocks[e0 : e0 + step], scales[e0 : e0 + step], compute)
        out_eio[e0 : e0 + step] = rows_eoi.transpose(0, 2, 1)
    return out_eio


def quantize(x_eio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [E, in, out] -> (blocks [E, out, in/32, 16], scales [E, out, in/32]): model/quant.py's MXFP4
    quantisation (each block of 32 inputs scaled by the smallest power of two that fits it within 6,
    values rounded to the nearest E2M1 value, ties to even) in the file's layout."""
    values, scales = quant.Mxfp4().quantize(jnp.asarray(x_eio, jnp.float32))
    return to_file(np.asarray(values), np.asarray(scales))


def to_file(values: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our [..., in/2, out] values and [..., in/32, out] scales -> the file's blocks
    [..., out, in/32, 16] and scales [..., out, in/32] (C-contiguous: safetensors writes the raw
    buffer; writable copies)."""
    blocks = np.swapaxes(values, -1, -2)
    blocks = blocks.reshape(*blocks.shape[:-1], -1, BLOCK // 2)
    return np.array(blocks, order="C"), np.array(np.swapaxes(scales, -1, -2), order="C")

"""Fine-grained FP8 weights, as DeepSeek-V3/R1, Kimi K2, Moonlight, Qwen3-MoE-FP8 and GLM-4.5-FP8
checkpoints on the Hugging Face Hub store them.

A quantised weight `<name>` [..., out, in] is stored as FP8 (F8_E4M3) next to `<name>_scale_inv`
[..., ceil(out/bo), ceil(in/bi)] (float32): one multiplier per bo x bi block, the last row and
column of blocks partial where out or in is not a multiple. [bo, bi] is config.json's
`quantization_config.weight_block_size` ([128, 128] on the Hub); null there means one scale per
matrix (a single block of its whole size). Which tensors are quantised is read from the files (their
dtype and scale), not from `modules_to_not_convert`.

`dequantize` matches transformers' `Fp8Dequantize` bit for bit: the float32 product of the FP8 value
and its block's scale, rounded (to nearest even) to the output dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from esft_jax.model.config import ConfigError

SCALE_SUFFIX = "_scale_inv"
DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors names of the FP8 formats
DEFAULT_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config default
Block = tuple[int, int] | None  # [rows, cols] of a scale's block; None: one scale per matrix


def scale_name(name: str) -> str:
    """The file tensor holding the scales of FP8 tensor `name`."""
    return name + SCALE_SUFFIX


def block_size(quant: Mapping[str, Any]) -> Block:
    """The block of a `quantization_config` whose quant_method is "fp8" (ConfigError if malformed)."""
    block = quant.get("weight_block_size", DEFAULT_BLOCK)
    if block is None:
        return None
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ConfigError(
            f"quantization_config.weight_block_size {block!r} is not two positive integers "
            "(or null: one scale per matrix)"
        )
    return (block[0], block[1])


def scale_shape(shape: tuple[int, ...], block: Block) -> tuple[int, ...]:
    """The scale grid [..., ceil(out/bo), ceil(in/bi)] of an FP8 tensor of `shape` [..., out, in]."""
    if len(shape) < 2:
        raise ValueError(f"an FP8 tensor with scales must be a matrix, not of shape {list(shape)}")
    if block is None:
        return (*shape[:-2], 1, 1)
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def scale_rows(rows: slice, block: Block) -> slice:
    """The block rows of the scale grid that hold the scales of matrix rows `rows` (a contiguous
    slice with bounds)."""
    if block is None:
        return slice(0, 1)
    return slice(rows.start // block[0], -(-rows.stop // block[0]))


def dequantize(
    w: np.ndarray,
    scale: np.ndarray,
    block: Block,
    dtype: Any = ml_dtypes.bfloat16,
    *,
    first_row: int = 0,
    chunk_values: int = 1 << 24,
) -> np.ndarray:
    """w [..., n, in] FP8, scale [..., R, ceil(in/bi)] float -> [..., n, in] in `dtype`.

    `w` may be rows first_row..first_row+n of a stored matrix (a sharded load reads a device's rows):
    `scale` then holds the grid's block rows from first_row // bo on (`scale_rows`). Rows are decoded
    about `chunk_values` values at a time, so the float32 temporaries stay small next to the output.
    """
    *lead, n, n_in = w.shape
    bo, bi = block if block is not None else (max(n, 1), max(n_in, 1))
    offset = first_row % bo if block is not None else 0
    expected = (*lead, -(-(offset + n) // bo), -(-n_in // bi))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"FP8 scales {list(scale.shape)} do not match weights {list(w.shape)} "
            f"in blocks of {[bo, bi]} (expected {list(expected)})"
        )
    w_lni = w.reshape(-1, n, n_in)
    scale_lri = scale.reshape(-1, *expected[-2:]).astype(np.float32)
    out_lni = np.empty(w_lni.shape, dtype)
    step = max(1, chunk_values // max(1, n_in))
    for i in range(w_lni.shape[0]):
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            scale_ri = scale_lri[i, (offset + np.arange(r0, r1)) // bo]  # each row's block row
            values = w_lni[i, r0:r1].astype(np.float32)
            values *= np.repeat(scale_ri, bi, axis=1)[:, :n_in]
            out_lni[i, r0:r1] = values
    return out_lni.reshape(w.shape)

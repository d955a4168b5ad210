"""`--config.model.frozen_dtype=native`: a quantised checkpoint's weights read as it stores them, not
dequantised (model/quant.py and model/params.py hold and use them).

The experts are what an MoE checkpoint is made of (DeepSeek-V3: 654 of its 671 B parameters; gpt-oss-20b:
19 of 21 B), and ESFT never trains most of them: kept as stored they take a half (FP8) or a quarter
(MXFP4) of the device memory of bf16. Kept: the routed experts in fine-grained FP8 with a block size
(quantization_config.weight_block_size), each expert matrix its own file tensor, and then the
attention, dense and shared-MLP matrices too where the files hold every one in FP8 (`linears_fp8`);
MXFP4 experts as gpt-oss stores them (every expert of a layer in one `_blocks` / `_scales` pair).
Everything else (router, norms, embeddings, the selected experts' trained copies) loads in bf16 as
before. Refused in one line: per-matrix FP8 scales, FP8 experts fused into one tensor, and an
adapter applied at load (its rows would need re-quantising).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from esft_jax.checkpoint import fp8, mxfp4
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.checkpoint.hf_names import TensorMap, tensor_maps
from esft_jax.model import quant
from esft_jax.model.config import ConfigError, ModelConfig
from esft_jax.model.params import is_fp8_linear

NO_ADAPTER = (
    "frozen_dtype=native with an adapter applied at load: its experts would need re-quantising; "
    "use frozen_dtype=bfloat16"
)


def expert_fields(hf_config: Mapping[str, Any], frozen_dtype: str) -> dict[str, Any]:
    """The ModelConfig fields that say how a checkpoint's experts are held: its FP8 block or MXFP4
    with native, nothing otherwise or when it is not quantised (ConfigError for what native cannot
    keep)."""
    q = hf_config.get("quantization_config")
    if frozen_dtype != "native" or not isinstance(q, Mapping):
        return {}
    method = q.get("quant_method")
    if method == "mxfp4":
        return {"expert_mxfp4": True}
    if method != "fp8":
        return {}
    block = fp8.block_size(q)
    if block is None:
        raise ConfigError(
            "frozen_dtype=native needs FP8 scales per block (weight_block_size), not one per "
            "matrix; use frozen_dtype=bfloat16"
        )
    return {"expert_fp8_block": block}


def linears_fp8(where: Mapping[str, Any], cfg: ModelConfig) -> bool:
    """Whether every FP8_LINEARS tensor of the model has FP8 scales in the files (`where`: hf.py's
    location of each tensor): cfg.linear_fp8 for a native load of an FP8 checkpoint."""
    linears = [m for m in tensor_maps(cfg) if is_fp8_linear(m.path)]
    return bool(linears) and all(
        m.hf_name in where and where[m.hf_name].scale is not None for m in linears
    )


def is_expert_matrix(path: tuple[str, ...]) -> bool:
    """A routed expert matrix (its quantised values), as opposed to its scales or any other tensor."""
    return len(path) >= 2 and path[-2] == "experts" and path[-1] in quant.QUANTIZED


def is_native(path: tuple[str, ...], cfg: ModelConfig) -> bool:
    """A matrix `cfg` holds quantised, as the checkpoint stores it (its scales: `scale_path`)."""
    if cfg.expert_scheme is not None and is_expert_matrix(path):
        return True
    return cfg.linear_fp8 and is_fp8_linear(path)


def is_native_scale(path: tuple[str, ...], cfg: ModelConfig) -> bool:
    return path[-1].endswith(quant.SCALE) and is_native(matrix_path(path), cfg)


def matrix_path(scale_path: tuple[str, ...]) -> tuple[str, ...]:
    return (*scale_path[:-1], scale_path[-1].removesuffix(quant.SCALE))


def scale_path(matrix: tuple[str, ...]) -> tuple[str, ...]:
    return (*matrix[:-1], matrix[-1] + quant.SCALE)


def read(open_files, plan, m: TensorMap, scheme: quant.Scheme, scales: bool = False) -> np.ndarray:
    """Matrix `m`'s quantised values as stored, or with `scales` its scales, in our layout
    (model/quant.py's shapes for `scheme` of its 2-D [in, out] view; an FP8 linear's values in
    its own shape); checked as a dequantising load checks them."""
    use = plan.where[m.hf_name]
    want = scheme.shapes(m.hf_shape[::-1])[1 if scales else 0]
    if isinstance(scheme, quant.Mxfp4):
        value = _read_mxfp4(open_files, plan, use, scales)
    else:
        value = _read_fp8(open_files, plan, m, use, scales)
    if value.shape != want:
        raise CheckpointError(
            f"{use.file}: tensor {use.key} holds {m.hf_name} as {list(value.shape)} "
            f"({'scales' if scales else 'values'}, our layout), expected {list(want)}"
        )
    return value if scales or isinstance(scheme, quant.Mxfp4) else value.reshape(m.shape)


def _read_fp8(open_files, plan, m: TensorMap, use, scales: bool) -> np.ndarray:
    if use.fused is not None or use.packed:
        raise CheckpointError(
            f"{use.file}: tensor {use.key} holds several experts in one tensor; frozen_dtype=native "
            "reads FP8 experts stored one matrix each: use frozen_dtype=bfloat16"
        )
    if use.scale is None:
        raise CheckpointError(
            f"{use.file}: tensor {use.key} has no FP8 scales: it is not FP8, so "
            "frozen_dtype=native has nothing to keep; use frozen_dtype=bfloat16"
        )
    from esft_jax.checkpoint import hf  # the reader's checks; hf imports this module

    stored = open_files(use.file).get_slice(use.key)
    shape = hf._check_fp8(open_files, plan, use, stored.get_dtype())
    if stored.get_dtype() != "F8_E4M3":
        raise CheckpointError(
            f"{use.file}: tensor {use.key} is {stored.get_dtype()}; frozen_dtype=native keeps "
            "F8_E4M3 weights: use frozen_dtype=bfloat16"
        )
    if tuple(shape) != m.hf_shape:
        raise CheckpointError(
            f"{use.file}: tensor {m.hf_name} has shape {list(shape)}, expected {list(m.hf_shape)}"
        )
    if scales:
        value = open_files(plan.files[use.scale]).get_slice(use.scale)[:].astype(np.float32)
    else:
        value = stored[:]  # float8_e4m3fn: the stored bytes
    return np.ascontiguousarray(value.T)


def _read_mxfp4(open_files, plan, use, scales: bool) -> np.ndarray:
    """One expert's part of a gpt-oss `_blocks` [E, out, in/32, 16] / `_scales` [E, out, in/32] pair:
    the expert's slice in our [in/2 or in/32, out] layout, cut into its part (gate / up) as the
    family's fused layout cuts a dequantised slice."""
    if not use.packed or use.fused is None:
        raise CheckpointError(
            f"{use.file}: tensor {use.key} is not MXFP4 blocks of every expert of a layer, as the "
            "config's quant_method 'mxfp4' says; use frozen_dtype=bfloat16"
        )
    name = mxfp4.packed_names(use.key)[1 if scales else 0]
    stored = open_files(plan.files[name]).get_slice(name)
    if stored.get_dtype() != "U8" or len(stored.get_shape()) != (3 if scales else 4):
        raise CheckpointError(
            f"{plan.files[name]}: tensor {name} is {stored.get_dtype()} {stored.get_shape()}, "
            f"not MXFP4's uint8 [E, out, in/32{'' if scales else ', 16'}]"
        )
    slice_e = stored[use.expert : use.expert + 1][0]
    ours_e = slice_e.reshape(slice_e.shape[0], -1).T  # [in/2 or in/32, out]
    return np.ascontiguousarray(use.fused.split(ours_e)[use.part].T)

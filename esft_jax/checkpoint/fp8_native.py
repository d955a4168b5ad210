"""`--config.model.frozen_dtype=native`: the routed experts' FP8 matrices and block scales read as the
checkpoint stores them, not dequantised (model/quant.py holds and uses them).

The experts are what an MoE checkpoint is made of (DeepSeek-V3: 654 of its 671 B parameters), and ESFT
never trains most of them: kept in FP8 they take half the device memory of bf16. Everything else
(attention, dense and shared MLPs, the selected experts' trained copies) loads in bf16 as before.
Supported: fine-grained FP8 with a block size (quantization_config.weight_block_size), each expert
matrix its own file tensor. Refused in one line: per-matrix scales, experts fused into one tensor, MXFP4
(not kept quantised yet), and an adapter applied at load (its rows would need re-quantising).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from esft_jax.checkpoint import fp8
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.checkpoint.hf_names import TensorMap
from esft_jax.model import quant
from esft_jax.model.config import ConfigError

NO_ADAPTER = (
    "frozen_dtype=native with an adapter applied at load: its experts would need re-quantising; "
    "use frozen_dtype=bfloat16"
)


def expert_block(hf_config: Mapping[str, Any], frozen_dtype: str) -> tuple[int, ...]:
    """ModelConfig.expert_fp8_block for a checkpoint's config.json: its FP8 block with native, ()
    otherwise or when it is not quantised (ConfigError for what native cannot keep)."""
    q = hf_config.get("quantization_config")
    if frozen_dtype != "native" or not isinstance(q, Mapping):
        return ()
    method = q.get("quant_method")
    if method == "mxfp4":
        raise ConfigError(
            "frozen_dtype=native: MXFP4 experts are not kept quantised yet; use frozen_dtype=bfloat16"
        )
    if method != "fp8":
        return ()
    block = fp8.block_size(q)
    if block is None:
        raise ConfigError(
            "frozen_dtype=native needs FP8 scales per block (weight_block_size), not one per "
            "matrix; use frozen_dtype=bfloat16"
        )
    return block


def is_expert_matrix(path: tuple[str, ...]) -> bool:
    """A routed expert matrix (its FP8 values), as opposed to its scales or any other tensor."""
    return len(path) >= 2 and path[-2] == "experts" and path[-1] in quant.QUANTIZED


def is_expert_scale(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-2] == "experts" and path[-1].endswith(quant.SCALE)


def matrix_path(scale_path: tuple[str, ...]) -> tuple[str, ...]:
    return (*scale_path[:-1], scale_path[-1].removesuffix(quant.SCALE))


def scale_path(matrix: tuple[str, ...]) -> tuple[str, ...]:
    return (*matrix[:-1], matrix[-1] + quant.SCALE)


def read(open_files, plan, m: TensorMap, scales: bool = False) -> np.ndarray:
    """Expert matrix `m`'s FP8 values [in, out] as stored, or with `scales` its block scales
    [ceil(in/bi), ceil(out/bo)], in our (transposed) layout; checked as a dequantising load checks
    them."""
    use = plan.where[m.hf_name]
    if use.fused is not None or use.packed:
        raise CheckpointError(
            f"{use.file}: tensor {use.key} holds several experts in one tensor; frozen_dtype=native "
            "reads experts stored one matrix each: use frozen_dtype=bfloat16"
        )
    if use.scale is None:
        raise CheckpointError(
            f"{use.file}: tensor {use.key} has no FP8 scales: the experts are not FP8, so "
            "frozen_dtype=native has nothing to keep; use frozen_dtype=bfloat16"
        )
    from esft_jax.checkpoint import hf  # the reader's checks; hf imports this module

    stored = open_files(use.file).get_slice(use.key)
    shape = hf._check_fp8(open_files, plan, use, stored.get_dtype())
    if stored.get_dtype() != "F8_E4M3":
        raise CheckpointError(
            f"{use.file}: tensor {use.key} is {stored.get_dtype()}; frozen_dtype=native keeps "
            "F8_E4M3 experts: use frozen_dtype=bfloat16"
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

"""Adapters: only the tensors a fine-tune changed, under their Hugging Face names.

`adapter.safetensors` holds either full tensors (`model.layers.12.mlp.experts.33.gate_proj.weight`)
or LoRA factors (`....gate_proj.lora_A.weight` [r, in], `....lora_B.weight` [out, r], merged as
W + (alpha / r) * B @ A, the PEFT convention); `adapter_config.json` says how it was made.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from esft_jax.checkpoint import native
from esft_jax.checkpoint.hf import CheckpointError, load_checkpoint, read_safetensors
from esft_jax.checkpoint.hf_names import TensorMap, tensor_maps
from esft_jax.checkpoint.output_dir import staged_dir
from esft_jax.jsonio import read_json
from esft_jax.model.config import ModelConfig
from esft_jax.tree import get_path, set_path

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


def write_adapter(
    out_dir: str | Path,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, Any],
    inputs: Collection[str | Path] = (),
) -> Path:
    """Write atomically (staged beside `out_dir`, moved into place when complete), replacing only a
    previous adapter: an `out_dir` holding any other file, or that is, holds or lies inside one of
    `inputs`, is refused (OutputDirError)."""
    out_dir = Path(out_dir)
    with staged_dir(out_dir, replaceable={ADAPTER_FILE, CONFIG_FILE}, inputs=inputs) as tmp:
        save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()},
            tmp / ADAPTER_FILE,
            metadata={"format": "pt"},
        )
        (tmp / CONFIG_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    return out_dir


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors by Hugging Face name, adapter_config.json), with errors that name the bad file."""
    adapter_dir = Path(adapter_dir)
    missing = f"no such file (is {adapter_dir} an adapter directory?)"
    metadata = read_json(adapter_dir / CONFIG_FILE, CheckpointError, missing)
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: expected a JSON object")
    for key in ("r", "lora_alpha"):  # LoRA's scale
        value = metadata.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(
                f"{adapter_dir / CONFIG_FILE}: '{key}' must be a positive number, got {value!r}"
            )
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{adapter_dir / ADAPTER_FILE}: {missing}")
    with read_safetensors(adapter_dir / ADAPTER_FILE) as f:
        return {name: f.get_tensor(name) for name in f.keys()}, metadata


def _slice(params: dict, m: TensorMap) -> np.ndarray:
    leaf = get_path(params, m.path)
    return leaf[m.index] if m.index else leaf


def _assign(params: dict, m: TensorMap, value: np.ndarray) -> None:
    if m.index:
        get_path(params, m.path)[m.index] = value
    else:
        set_path(params, m.path, value)


Update = Callable[[np.ndarray], np.ndarray]  # a tensor's old value -> new value, both in our layout


def adapter_updates(
    cfg: ModelConfig,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, Any],
    where: str = "adapter",
) -> list[tuple[TensorMap, Update]]:
    """Per TensorMap the adapter changes, how it changes it (in the adapter's order), names and shapes
    checked: so a loader can apply an adapter one tensor at a time."""
    maps = {m.hf_name: m for m in tensor_maps(cfg)}
    scale = metadata.get("lora_alpha", 1.0) / metadata.get("r", 1)
    updates: list[tuple[TensorMap, Update]] = []
    for name, value in tensors.items():
        if name.endswith(LORA_B):
            continue
        base = name[: -len(LORA_A)] + ".weight" if name.endswith(LORA_A) else name
        if base not in maps:
            raise CheckpointError(
                f"{where}: tensor {name} is not part of this {cfg.model_type} model"
            )
        m = maps[base]
        if name.endswith(LORA_A):
            update = functools.partial(
                _merge_lora, m, tensors[base[: -len(".weight")] + LORA_B], value, scale
            )
        elif tuple(value.shape) != m.hf_shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {list(value.shape)}, expected {list(m.hf_shape)}"
            )
        else:
            update = functools.partial(_replace, m, value)
        updates.append((m, update))
    return updates


def _merge_lora(
    m: TensorMap, lora_b: np.ndarray, lora_a: np.ndarray, scale: float, old: np.ndarray
) -> np.ndarray:
    """W + scale * B @ A in float32, W [out, in] the HF form of `old`; back in old's layout and dtype."""
    merged = m.to_hf(old).astype(np.float32) + scale * (
        lora_b.astype(np.float32) @ lora_a.astype(np.float32)
    )
    return m.from_hf(merged).astype(old.dtype)


def _replace(m: TensorMap, value: np.ndarray, old: np.ndarray) -> np.ndarray:
    return m.from_hf(value).astype(old.dtype)


def apply_adapter(
    params: dict,
    cfg: ModelConfig,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, Any],
    where: str = "adapter",
) -> dict:
    """Params (a numpy pytree, copied) with the adapter's tensors replaced or LoRA-merged in."""
    params = _copy(params)
    for m, update in adapter_updates(cfg, tensors, metadata, where):
        _assign(params, m, update(_slice(params, m)))
    return params


def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else np.array(tree)


def load_with_adapter(
    base_dir: str | Path, adapter_dir: str | Path, **runtime: Any
) -> tuple[ModelConfig, dict]:
    """(config, numpy params) of a base checkpoint with an adapter applied."""
    cfg, params = load_checkpoint(base_dir, **runtime)
    if cfg.expert_scheme is not None:
        raise CheckpointError(native.NO_ADAPTER)
    tensors, metadata = read_adapter(adapter_dir)
    return cfg, apply_adapter(params, cfg, tensors, metadata, str(adapter_dir))

"""Write a Hugging Face checkpoint directory in the layout of the family's Hub checkpoints, unquantised."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from esft_jax.checkpoint.families import Family, family
from esft_jax.checkpoint.hf import INDEX_FILE, SINGLE_FILE
from esft_jax.checkpoint.hf_names import config_to_hf, tensor_maps
from esft_jax.checkpoint.output_dir import export_replaceable, staged_dir, write_marker
from esft_jax.checkpoint.tokenizer import write_tokenizer_files
from esft_jax.model.config import ModelConfig
from esft_jax.model.params import Params
from esft_jax.tree import get_path


def _fuse(tensors: dict[str, np.ndarray], fam: Family, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Canonical per-expert tensors joined into the family's fused Hub layout (if it has one)."""
    for layer in cfg.moe_layer_ids:
        prefix = f"model.layers.{layer}."
        for fz in fam.write_fused:
            names = [
                [prefix + part.format(e=e) for part in fz.parts]
                for e in range(cfg.n_routed_experts)
            ]
            if names[0][0] not in tensors:
                continue
            experts = [fz.join(tuple(tensors.pop(n) for n in row)) for row in names]
            # C order: np.stack keeps transposed parts' F order, and safetensors writes the raw buffer.
            tensors[prefix + fz.name] = np.ascontiguousarray(np.stack(experts))
    return tensors


def save_checkpoint(
    out_dir: str | Path,
    cfg: ModelConfig,
    params: Params,
    *,
    tokenizer_from: str | Path | None = None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
    inputs: Collection[str | Path] = (),
    dtype: str | None = None,
) -> Path:
    """Write params as a Hugging Face checkpoint directory that transformers loads and generates from
    as esft does (tokenizer files: checkpoint/tokenizer.py), with a marker listing what it wrote.
    `dtype` (model/config.py DTYPES): every weight and config.json's dtype cast to it; None: as held.

    Destroys nothing: `out_dir` must be new or empty, or with `overwrite` a previous export holding
    only its own files, and must not overlap `tokenizer_from` or `inputs` (else OutputDirError, before
    any work). Files are staged beside `out_dir` and moved into place when complete, so an interrupted
    save leaves `out_dir` as it was.
    """
    out_dir = Path(out_dir)
    inputs = [*inputs, *([tokenizer_from] if tokenizer_from is not None else [])]
    replaceable = export_replaceable(out_dir, overwrite, inputs)
    host = jax.tree.map(np.asarray, params)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=dtype)
        host = jax.tree.map(lambda a: a.astype(jax.numpy.dtype(dtype)), host)
    fam = family(cfg.model_type)
    tensors = _fuse(
        {m.hf_name: m.to_hf(get_path(host, m.path)[m.index]) for m in tensor_maps(cfg)}, fam, cfg
    )
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if size and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    with staged_dir(out_dir, replaceable=replaceable, inputs=inputs) as tmp:
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.nbytes for s in shards for v in s.values())
            (tmp / INDEX_FILE).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
        write_tokenizer_files(tokenizer_from, tmp, cfg)
        write_marker(tmp, "esft_jax.checkpoint.save_checkpoint")
    return out_dir

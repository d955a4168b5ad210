"""Read and write Hugging Face checkpoint directories (config.json + safetensors, one or sharded).

Tensors are streamed one file tensor at a time from the safetensors files into our stacked layout
(no PyTorch model is ever built) and keep the file's dtype; the router is kept in float32, as the
reference does. Reading accepts the family's canonical per-expert names and the fused layouts it
declares (checkpoint/families), MXFP4-packed tensors dequantised to bfloat16 (checkpoint/mxfp4.py);
writing produces the layout of the family's Hub checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from ml_dtypes import bfloat16
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from esft_jax.checkpoint import mxfp4
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.checkpoint.families import Family, family
from esft_jax.checkpoint.families.base import Fused
from esft_jax.checkpoint.hf_names import TensorMap, config_from_hf, config_to_hf, tensor_maps
from esft_jax.checkpoint.output_dir import export_replaceable, staged_dir, write_marker
from esft_jax.checkpoint.safetensors_read import TensorFile
from esft_jax.checkpoint.tokenizer import write_tokenizer_files
from esft_jax.jsonio import read_json
from esft_jax.model.config import ConfigError, ModelConfig
from esft_jax.model.params import Params, flat_param_specs
from esft_jax.tree import get_path, set_path

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FLOAT32_PATHS = {
    ("moe_layers", "moe", "router"),
    ("moe_layers", "moe", "router_bias"),
    ("moe_layers", "moe", "router_correction"),
}
_LAYER_NAME = re.compile(r"(model\.layers\.\d+\.)(.+)")
# Tensors a checkpoint may hold that the model does not use: rotary caches of old checkpoints.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@contextlib.contextmanager
def read_safetensors(path: Path) -> Iterator[TensorFile]:
    """The file's tensors (read without a memory map: checkpoint/safetensors_read.py), its layout
    checked by `safe_open` first, whose errors (a truncated file, a garbled header) are one
    CheckpointError line."""
    try:
        with safe_open(path, "numpy"):
            pass
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    with open(path, "rb") as fh:
        yield TensorFile(fh)


class OpenFiles:
    """Opens each safetensors file of a load once, on first use (`open_files(path)`), and closes them
    all on exit; `bytes_read` is the tensor bytes read from them so far."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._files: dict[Path, TensorFile] = {}

    def __enter__(self) -> OpenFiles:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def __call__(self, path: Path) -> TensorFile:
        if path not in self._files:
            self._files[path] = self._stack.enter_context(read_safetensors(path))
        return self._files[path]

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self._files.values())


def load_config(ckpt_dir: str | Path, **runtime: Any) -> ModelConfig:
    """Our ModelConfig from `<ckpt_dir>/config.json`; `runtime` sets dtype/strategy fields."""
    path = Path(ckpt_dir) / "config.json"
    hf = read_json(
        path, CheckpointError, f"no such file (is {ckpt_dir} a Hugging Face checkpoint directory?)"
    )
    try:
        return config_from_hf(hf, **runtime)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _weight_files(ckpt_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, CheckpointError, "no such file").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = {name: ckpt_dir / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index} but missing")
        return files
    single = ckpt_dir / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{ckpt_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with read_safetensors(single) as f:
        return {name: single for name in f.keys()}


class _Use(NamedTuple):
    """Where a canonical tensor is in the files: file tensor `key` (MXFP4 base name if packed),
    and for a fused tensor, expert `expert`'s part `part`."""

    file: Path
    key: str
    packed: bool = False
    fused: Fused | None = None
    expert: int = 0
    part: int = 0


def _locate(files: dict[str, Path], fam: Family, num_experts: int) -> dict[str, _Use]:
    """Canonical tensor name -> where it is, for every tensor the files hold in any known layout."""
    packed = {
        n.removesuffix("_blocks")
        for n in files
        if n.endswith("_blocks") and mxfp4.is_mxfp4(files, n.removesuffix("_blocks"))
    }
    fused = {fz.name: fz for fz in fam.read_fused}
    where: dict[str, _Use] = {}
    for key in [*files, *packed]:
        where[key] = _Use(files[key + "_blocks" if key in packed else key], key, key in packed)
        match = _LAYER_NAME.fullmatch(key)
        if not match:
            continue
        prefix, suffix = match.groups()
        if suffix in fam.read_renames:
            where[prefix + fam.read_renames[suffix]] = where[key]
        if suffix in fused:
            fz = fused[suffix]
            for e in range(num_experts):
                for i, part in enumerate(fz.parts):
                    where[prefix + part.format(e=e)] = where[key]._replace(
                        fused=fz, expert=e, part=i
                    )
    return where


def _read(
    open_files: OpenFiles, use: _Use, files: dict[str, Path], rows: slice | None = None
) -> np.ndarray:
    """File tensor `use` (MXFP4 blocks and scales dequantised, wherever the scales are), or only
    `rows` of its leading dim."""

    def get(file: Path, name: str) -> np.ndarray:
        return (
            open_files(file).get_tensor(name)
            if rows is None
            else open_files(file).get_slice(name)[rows]
        )

    if not use.packed:
        return get(use.file, use.key)
    blocks, scales = mxfp4.packed_names(use.key)
    return mxfp4.dequantize(get(use.file, blocks), get(files[scales], scales), bfloat16)


class Plan(NamedTuple):
    """What a load reads: the file of each file tensor, where each canonical tensor is, and the
    model's TensorMaps (every one of them located)."""

    files: dict[str, Path]
    where: dict[str, _Use]
    maps: list[TensorMap]


def plan(ckpt_dir: str | Path, cfg: ModelConfig) -> Plan:
    """Locate every tensor the model needs (CheckpointError naming the missing ones); warn about
    file tensors the model does not use. Reads only the files' headers."""
    ckpt_dir = Path(ckpt_dir)
    files = _weight_files(ckpt_dir)
    where = _locate(files, family(cfg.model_type), cfg.n_routed_experts)
    maps = tensor_maps(cfg)
    missing = [m for m in maps if m.hf_name not in where]
    if missing:
        shown = ", ".join(f"{m.hf_name} {list(m.hf_shape)}" for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{ckpt_dir}: missing tensors (expected shape): {shown}{more}")
    used = {where[m.hf_name].key for m in maps}
    extra = [
        n
        for n in files
        if n.removesuffix("_blocks").removesuffix("_scales") not in used and not _IGNORED.match(n)
    ]
    if extra:  # e.g. DeepSeek-V3's multi-token-prediction layers
        log.warning(
            "%s: ignoring %d tensors the model does not use, e.g. %s",
            ckpt_dir,
            len(extra),
            extra[0],
        )
    return Plan(files, where, maps)


def load_params(ckpt_dir: str | Path, cfg: ModelConfig) -> Params:
    """Read every tensor the model needs into a numpy params pytree (stacked layout)."""
    files, where, maps = plan(ckpt_dir, cfg)
    by_file: dict[Path, dict[str, list[TensorMap]]] = {}  # each file tensor is read once
    for m in maps:
        use = where[m.hf_name]
        by_file.setdefault(use.file, {}).setdefault(use.key, []).append(m)
    specs = flat_param_specs(cfg)
    params: Params = {}
    with OpenFiles() as open_files:
        for file, by_key in by_file.items():
            for key_maps in by_key.values():
                tensor = _read(open_files, where[key_maps[0].hf_name], files)
                for m in key_maps:
                    _put(params, specs, m, _part(tensor, where[m.hf_name], file, m))
    return params


def _part(tensor: np.ndarray, use: _Use, file: Path, m: TensorMap) -> np.ndarray:
    """The canonical tensor `m` out of the file tensor, shape-checked."""
    value = tensor if use.fused is None else use.fused.split(tensor[use.expert])[use.part]
    if tuple(value.shape) != m.hf_shape:
        shown = m.hf_name if use.fused is None else f"{m.hf_name} (from {use.key})"
        raise CheckpointError(
            f"{file}: tensor {shown} has shape {list(value.shape)}, expected {list(m.hf_shape)}"
        )
    return value


def ours(m: TensorMap, hf_value: np.ndarray) -> np.ndarray:
    """The HF tensor of `m` in our layout and dtype (the file's, float32 for the router)."""
    value = m.from_hf(hf_value)
    return value.astype(np.float32) if m.path in _FLOAT32_PATHS else value


def _put(params: Params, specs: dict, m: TensorMap, hf_value: np.ndarray) -> None:
    value = ours(m, hf_value)
    if not m.index:
        set_path(params, m.path, value)
        return
    try:
        dest = get_path(params, m.path)
    except KeyError:
        dest = np.empty(specs[m.path].shape, value.dtype)
        set_path(params, m.path, dest)
    dest[m.index] = value


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


def load_checkpoint(ckpt_dir: str | Path, **runtime: Any) -> tuple[ModelConfig, Params]:
    """(config, params as jax arrays) from a Hugging Face checkpoint directory."""
    cfg = load_config(ckpt_dir, **runtime)
    return cfg, jax.tree.map(jax.numpy.asarray, load_params(ckpt_dir, cfg))


def save_checkpoint(
    out_dir: str | Path,
    cfg: ModelConfig,
    params: Params,
    *,
    tokenizer_from: str | Path | None = None,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
    inputs: Collection[str | Path] = (),
) -> Path:
    """Write params as a Hugging Face checkpoint directory that transformers loads and generates from
    as esft does (tokenizer files: checkpoint/tokenizer.py), with a marker listing what it wrote.

    Destroys nothing: `out_dir` must be new or empty, or with `overwrite` a previous export holding
    only its own files, and must not overlap `tokenizer_from` or `inputs` (else OutputDirError, before
    any work). Files are staged beside `out_dir` and moved into place when complete, so an interrupted
    save leaves `out_dir` as it was.
    """
    out_dir = Path(out_dir)
    inputs = [*inputs, *([tokenizer_from] if tokenizer_from is not None else [])]
    replaceable = export_replaceable(out_dir, overwrite, inputs)
    host = jax.tree.map(np.asarray, params)
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

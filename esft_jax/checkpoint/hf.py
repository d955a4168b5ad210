"""Read Hugging Face checkpoint directories (config.json + safetensors, one or sharded).

Tensors are streamed one file tensor at a time from the safetensors files into our stacked layout
(no PyTorch model is ever built) and keep the file's dtype; the router is kept in float32, as the
reference does. Reading accepts the family's canonical per-expert names and the fused layouts it
declares (checkpoint/families), MXFP4-packed and FP8 tensors dequantised to bfloat16
(checkpoint/mxfp4.py, checkpoint/fp8.py), and refuses any other non-float tensor. Writing:
checkpoint/hf_export.py.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from ml_dtypes import bfloat16
from safetensors import SafetensorError, safe_open

from esft_jax.checkpoint import fp8, mxfp4, native
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.checkpoint.families import Family, family
from esft_jax.checkpoint.families.base import Fused
from esft_jax.checkpoint.hf_names import TensorMap, config_from_hf, tensor_maps
from esft_jax.checkpoint.safetensors_read import TensorFile
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
_FLOATS = ("F64", "F32", "F16", "BF16")  # stored dtypes read as they are
DEQUANTIZED = bfloat16  # MXFP4 and FP8 tensors load in the dtype the Hub's models run them in


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
        cfg = config_from_hf(hf, **runtime)
        cfg = cfg.replace(**native.expert_fields(hf, cfg.frozen_dtype))
        if cfg.expert_fp8_block:  # the other linears too, where the files hold them in FP8
            where = _locate(
                _weight_files(Path(ckpt_dir)), family(cfg.model_type), cfg.n_routed_experts
            )
            cfg = cfg.replace(linear_fp8=native.linears_fp8(where, cfg))
        return cfg
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
    """Where a canonical tensor is in the files: file tensor `key` (MXFP4 base name if packed; its
    FP8 scales `scale` if it has any), and for a fused tensor, expert `expert`'s part `part`."""

    file: Path
    key: str
    packed: bool = False
    scale: str | None = None
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
        scale = fp8.scale_name(key) if fp8.scale_name(key) in files else None
        where[key] = _Use(
            files[key + "_blocks" if key in packed else key], key, key in packed, scale
        )
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


class Plan(NamedTuple):
    """What a load reads: the file of each file tensor, where each canonical tensor is, the
    model's TensorMaps (every one of them located) and the block of its FP8 scales (if any)."""

    files: dict[str, Path]
    where: dict[str, _Use]
    maps: list[TensorMap]
    fp8_block: fp8.Block = None


def _read(open_files: OpenFiles, plan: Plan, use: _Use, rows: slice | None = None) -> np.ndarray:
    """File tensor `use` (MXFP4 or FP8 dequantised, wherever their scales are), or only `rows` (a
    contiguous slice) of its leading dim. A tensor stored in another form than a float is refused."""

    def get(name: str, index: slice | None = rows) -> np.ndarray:
        stored = open_files(plan.files[name]).get_slice(name)
        return stored[slice(None) if index is None else index]

    if use.packed:
        blocks, scales = mxfp4.packed_names(use.key)
        try:
            return mxfp4.dequantize(get(blocks), get(scales), DEQUANTIZED)
        except ValueError as e:
            raise CheckpointError(f"{use.file}: tensor {use.key}: {e}") from None
    dtype = open_files(use.file).get_slice(use.key).get_dtype()
    if use.scale is None:
        if dtype not in _FLOATS:
            raise CheckpointError(
                f"{use.file}: tensor {use.key} is stored as {dtype} without scales, not as a float: "
                "a quantisation esft cannot read; dequantise the checkpoint to bf16 first"
            )
        return get(use.key)
    shape = _check_fp8(open_files, plan, use, dtype)
    if rows is None or len(shape) > 2:  # all rows, or some experts of a fused [E, out, in]
        return fp8.dequantize(get(use.key), get(use.scale), plan.fp8_block, DEQUANTIZED)
    rows = slice(*rows.indices(shape[0])[:2])
    scale = get(use.scale, fp8.scale_rows(rows, plan.fp8_block))
    return fp8.dequantize(
        get(use.key, rows), scale, plan.fp8_block, DEQUANTIZED, first_row=rows.start
    )


def _check_fp8(open_files: OpenFiles, plan: Plan, use: _Use, dtype: str) -> tuple[int, ...]:
    """The stored shape of FP8 tensor `use`, once its dtype and its scales' dtype and shape are
    checked (CheckpointError naming the file and tensor)."""
    shape = tuple(open_files(use.file).get_slice(use.key).get_shape())
    scale = open_files(plan.files[use.scale]).get_slice(use.scale)
    if dtype not in fp8.DTYPES:
        raise CheckpointError(
            f"{use.file}: tensor {use.key} has FP8 scales ({use.scale}) but is stored as {dtype}, "
            f"not as FP8 {fp8.DTYPES}; dequantise the checkpoint to bf16 first"
        )
    try:
        grid = fp8.scale_shape(shape, plan.fp8_block)
    except ValueError as e:
        raise CheckpointError(f"{use.file}: tensor {use.key}: {e}") from None
    if scale.get_dtype() not in _FLOATS or tuple(scale.get_shape()) != grid:
        raise CheckpointError(
            f"{plan.files[use.scale]}: tensor {use.scale} is {scale.get_dtype()} "
            f"{scale.get_shape()}, expected a float tensor of shape {list(grid)}: the scales of "
            f"{use.key} {list(shape)} in blocks of {plan.fp8_block or 'the whole matrix'}"
        )
    return shape


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
        if n.removesuffix("_blocks").removesuffix("_scales").removesuffix(fp8.SCALE_SUFFIX)
        not in used
        and not _IGNORED.match(n)
    ]
    if extra:  # e.g. DeepSeek-V3's multi-token-prediction layers
        log.warning(
            "%s: ignoring %d tensors the model does not use, e.g. %s",
            ckpt_dir,
            len(extra),
            extra[0],
        )
    scaled = sorted({where[m.hf_name].key for m in maps if where[m.hf_name].scale})
    return Plan(files, where, maps, _fp8_block(ckpt_dir, scaled[0]) if scaled else None)


def _fp8_block(ckpt_dir: Path, example: str) -> fp8.Block:
    """The block of the FP8 scales, from config.json's quantization_config (which must be fp8's)."""
    path = ckpt_dir / "config.json"
    q = read_json(path, CheckpointError, "no such file").get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        raise CheckpointError(
            f"{path}: tensors have FP8 scales (e.g. {fp8.scale_name(example)}) but there is no "
            "quantization_config with quant_method 'fp8' to say their block size"
        )
    try:
        return fp8.block_size(q)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_params(ckpt_dir: str | Path, cfg: ModelConfig) -> Params:
    """Read every tensor the model needs into a numpy params pytree (stacked layout)."""
    located = plan(ckpt_dir, cfg)
    where, maps = located.where, located.maps
    by_file: dict[Path, dict[str, list[TensorMap]]] = {}  # each file tensor is read once
    for m in maps:
        if native.is_native(m.path, cfg):
            continue
        use = where[m.hf_name]
        by_file.setdefault(use.file, {}).setdefault(use.key, []).append(m)
    specs = flat_param_specs(cfg)
    params: Params = {}
    with OpenFiles() as open_files:
        if cfg.expert_scheme is not None:  # frozen_dtype=native: quantised weights as stored
            _put_native(params, specs, located, open_files, cfg)
        for file, by_key in by_file.items():
            for key_maps in by_key.values():
                tensor = _read(open_files, located, where[key_maps[0].hf_name])
                for m in key_maps:
                    _put(params, specs, m, _part(tensor, where[m.hf_name], file, m))
    return params


def _put_native(
    params: Params, specs: dict, plan: Plan, open_files: OpenFiles, cfg: ModelConfig
) -> None:
    for m in plan.maps:
        if native.is_native(m.path, cfg):
            for path, scales in ((m.path, False), (native.scale_path(m.path), True)):
                value = native.read(open_files, plan, m, cfg.expert_scheme, scales)
                try:
                    dest = get_path(params, path)
                except KeyError:
                    dest = np.empty(specs[path].shape, value.dtype)
                    set_path(params, path, dest)
                dest[m.index] = value


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


def load_checkpoint(ckpt_dir: str | Path, **runtime: Any) -> tuple[ModelConfig, Params]:
    """(config, params as jax arrays) from a Hugging Face checkpoint directory."""
    cfg = load_config(ckpt_dir, **runtime)
    return cfg, jax.tree.map(jax.numpy.asarray, load_params(ckpt_dir, cfg))

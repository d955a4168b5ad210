"""Load a Hugging Face checkpoint straight onto a device mesh.

Each parameter is built with its final sharding by `jax.make_array_from_callback`: the callback gets
one device's block (a tuple of slices of the global shape) and assembles it on the host from only the
canonical tensors inside it, so an expert-parallel process never reads the experts other processes
hold, and host memory peaks near one parameter, not the whole model. Where a tensor's block is a plain
slice of its file tensor (no fused or MXFP4 layout, no adapter) only that slice is read. Locating,
reading, splitting and converting tensors is checkpoint/hf.py's code; adapters are checkpoint/adapter.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding

from esft_jax import sharding as shd
from esft_jax.checkpoint import hf, mxfp4
from esft_jax.checkpoint.adapter import Update, adapter_updates, read_adapter
from esft_jax.checkpoint.hf_names import TensorMap
from esft_jax.model.config import ModelConfig
from esft_jax.model.params import Params, flat_param_specs

STATS = {"bytes_read": 0}  # bytes of file tensors the last load read (for tests and benchmarks)

Index = tuple[slice, ...]
Opener = Callable[[Path], Any]


def load_params_sharded(ckpt_dir: str | Path, cfg: ModelConfig, mesh: Mesh | None = None,
                        adapter: str | Path | None = None) -> Params:
    """Params as jax arrays sharded by their logical axes over `mesh` (one device when None), with
    the adapter directory `adapter` (if any) applied; equal to `load_checkpoint` (+ `load_with_adapter`)
    placed with `shard_params`. Errors are hf.py's and adapter.py's."""
    plan = hf.plan(ckpt_dir, cfg)
    updates = _updates_by_name(cfg, adapter)
    by_path: dict[tuple[str, ...], list[TensorMap]] = {}
    for m in plan.maps:
        by_path.setdefault(m.path, []).append(m)
    STATS["bytes_read"] = 0
    params: Params = {}
    with contextlib.ExitStack() as stack:
        opened: dict[Path, Any] = {}

        def open_file(path: Path) -> Any:
            if path not in opened:
                opened[path] = stack.enter_context(hf.read_safetensors(path))
            return opened[path]

        for path, spec in flat_param_specs(cfg).items():
            cache: dict[tuple, np.ndarray] = {}  # devices holding the same block (replicas) share one read

            def callback(index: Index, path=path, shape=spec.shape, cache=cache) -> np.ndarray:
                key = tuple(s.indices(n) for s, n in zip(index, shape))
                if key not in cache:
                    cache[key] = _block(index, shape, by_path[path], plan, updates, open_file)
                return cache[key]

            hf._set(params, path, jax.make_array_from_callback(spec.shape, _sharding(spec.axes, mesh), callback))
    return params


def _sharding(axes: tuple[str | None, ...], mesh: Mesh | None) -> Sharding:
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, shd.logical_to_spec(axes, dict(mesh.shape)))


def _updates_by_name(cfg: ModelConfig, adapter: str | Path | None) -> dict[str, list[Update]]:
    """HF name -> the adapter's updates of that tensor, in the adapter's order (checked up front)."""
    if adapter is None:
        return {}
    tensors, metadata = read_adapter(adapter)
    out: dict[str, list[Update]] = {}
    for m, update in adapter_updates(cfg, tensors, metadata, str(adapter)):
        out.setdefault(m.hf_name, []).append(update)
    return out


def _block(index: Index, shape: tuple[int, ...], maps: list[TensorMap], plan: hf.Plan,
           updates: dict[str, list[Update]], open_file: Opener) -> np.ndarray:
    """One device's block of a leaf: the TensorMaps whose (layer[, expert]) fall in the block's
    stacked dims, each cut to the block's inner dims."""
    stacked = [range(*s.indices(n)) for s, n in zip(index, shape[:len(maps[0].index)])]
    inner = index[len(stacked):]
    block_shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
    block = None
    last: list[Any] = [None, None]  # the last whole file tensor read: a fused one serves all its experts
    for m in maps:
        if not all(i in r for i, r in zip(m.index, stacked)):
            continue
        value = _tensor_block(m, inner, plan, updates.get(m.hf_name, []), open_file, last)
        if block is None:
            block = np.empty(block_shape, value.dtype)
        block[tuple(r.index(i) for i, r in zip(m.index, stacked))] = value
    assert block is not None, "every block holds at least one tensor"
    return block


def _tensor_block(m: TensorMap, inner: Index, plan: hf.Plan, updates: list[Update], open_file: Opener,
                  last: list[Any]) -> np.ndarray:
    """Tensor `m` in our layout and dtype, restricted to `inner`, adapter updates applied."""
    use = plan.where[m.hf_name]
    f = open_file(use.file)
    hf_index = None if updates else _direct_index(m, use, inner)
    if hf_index is not None:
        stored = f.get_slice(use.key)
        # hf._part's shape check, on a stand-in of the stored shape that holds no data
        hf._part(np.broadcast_to(np.zeros((), np.uint8), tuple(stored.get_shape())), use, use.file, m)
        value = stored[hf_index]
        STATS["bytes_read"] += value.nbytes
        block_shape = tuple(len(range(*s.indices(n))) for s, n in zip(inner, m.shape))
        return hf.ours(dataclasses.replace(m, shape=block_shape), value)
    if last[0] != (use.file, use.key):
        last[:] = [(use.file, use.key), None]  # drop the previous tensor before reading the next
        last[1] = hf._read(f, use, plan.files)
        STATS["bytes_read"] += _stored_bytes(use, last[1], plan.files, open_file)
    value = hf.ours(m, hf._part(last[1], use, use.file, m))
    for update in updates:
        value = update(value)
    return value[inner]


def _direct_index(m: TensorMap, use: hf._Use, inner: Index) -> tuple[slice, ...] | None:
    """The slice of the file tensor that is `inner` of ours, where ours is the file tensor itself
    (embedding, vectors) or its transpose (a 2-D linear weight); else None (read it whole)."""
    if use.fused is not None or use.packed:
        return None
    if m.n_in == 0 or (m.n_in is None and len(m.shape) == 1):
        return inner
    if m.n_in == 1 and len(m.shape) == 2:
        return inner[::-1]
    return None


def _stored_bytes(use: hf._Use, tensor: np.ndarray, files: dict[str, Path], open_file: Opener) -> int:
    """Bytes a whole read of `use` took from the files: the tensor's, or its MXFP4 blocks and scales (uint8)."""
    if not use.packed:
        return tensor.nbytes
    return sum(math.prod(open_file(files[n]).get_slice(n).get_shape()) for n in mxfp4.packed_names(use.key))

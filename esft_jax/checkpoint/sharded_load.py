"""Load a Hugging Face checkpoint straight onto a device mesh.

Each parameter is built with its final sharding, one device's block at a time: the block (a tuple
of slices of the global shape) is assembled on the host from only the canonical tensors inside it,
placed on its devices and dropped, so an expert-parallel process never reads the experts other processes
hold, and the host holds one block beyond the placed arrays, not the whole model. Where a tensor's
block is a plain slice of its file tensor (no fused or MXFP4 layout, no adapter) only that slice is
read (a slice of columns reads whole rows; of an FP8 matrix, those rows and their scales' block rows,
dequantised); a fused [E, ...] tensor (MXFP4, FP8 or neither) is read one expert's rows at a time,
once per part it holds (gate_up twice: gate and up are separate leaves).
Locating, reading, splitting and converting tensors is checkpoint/hf.py's code; adapters are
checkpoint/adapter.py's.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding

from esft_jax import sharding as shd
from esft_jax.checkpoint import hf, native
from esft_jax.checkpoint.adapter import Update, adapter_updates, read_adapter
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.checkpoint.hf_names import TensorMap
from esft_jax.model import quant
from esft_jax.model.config import ModelConfig
from esft_jax.model.params import Params, flat_param_specs
from esft_jax.tree import set_path

STATS = {
    "bytes_read": 0
}  # tensor bytes the last load read from the files (for tests and benchmarks)

Index = tuple[slice, ...]


def load_params_sharded(
    ckpt_dir: str | Path,
    cfg: ModelConfig,
    mesh: Mesh | None = None,
    adapter: str | Path | None = None,
) -> Params:
    """Params as jax arrays sharded by their logical axes over `mesh` (one device when None), with
    the adapter directory `adapter` (if any) applied; equal to `load_checkpoint` (+ `load_with_adapter`)
    placed with `shard_params`. Errors are hf.py's and adapter.py's."""
    plan = hf.plan(ckpt_dir, cfg)
    scheme = cfg.expert_scheme
    if scheme is not None and adapter is not None:
        raise CheckpointError(native.NO_ADAPTER)
    updates = _updates_by_name(cfg, adapter)
    by_path: dict[tuple[str, ...], list[TensorMap]] = {}
    for m in plan.maps:
        by_path.setdefault(m.path, []).append(m)
    params: Params = {}
    with hf.OpenFiles() as open_files:
        for path, spec in flat_param_specs(cfg).items():
            read = lambda index, path=path, shape=spec.shape: _block(  # noqa: E731
                index, shape, by_path[path], plan, updates, open_files
            )
            if native.is_native(path, cfg):
                read = _native_reader(spec.shape, by_path[path], plan, open_files, scheme, False)
            elif native.is_native_scale(path, cfg):
                matrix = native.matrix_path(path)
                read = _native_reader(spec.shape, by_path[matrix], plan, open_files, scheme, True)
            stacked = path[0] in ("dense_layers", "moe_layers")
            set_path(params, path, _place(spec.shape, _sharding(spec.axes, mesh), read, stacked))
        STATS["bytes_read"] = open_files.bytes_read
    return params


def _place(
    shape: tuple[int, ...],
    sharding: Sharding,
    read: Callable[[Index], np.ndarray],
    stacked: bool = False,
) -> jax.Array:
    """The array of `shape` with `sharding`, each device's block from `read(index)`. Unlike
    `jax.make_array_from_callback`, which reads every block before placing any, each block is placed
    as it is read and dropped once its last replica is placed, so the host holds one block at a time;
    a large block of a `stacked` (layers first) array, a layer at a time."""
    indices = sharding.addressable_devices_indices_map(shape)
    key = lambda index: tuple(s.indices(n) for s, n in zip(index, shape))  # noqa: E731
    replicas_left = collections.Counter(key(index) for index in indices.values())
    blocks: dict[tuple, np.ndarray] = {}
    shards = []
    for device, index in sorted(
        indices.items(), key=lambda item: key(item[1])
    ):  # replicas together
        k = key(index)
        if stacked and replicas_left[k] == 1 and _values(shape, index) > PIECEWISE_VALUES:
            shards.append(_place_by_rows(shape, index, read, device))
            continue
        if k not in blocks:
            blocks[k] = read(index)
        shards.append(jax.device_put(blocks[k], device))
        replicas_left[k] -= 1
        if not replicas_left[k]:
            jax.block_until_ready(shards[-1])  # the transfer is done with the host block
            del blocks[k]
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


# A device block of more values than this (e.g. a whole stacked leaf on one device) is read a row of
# its leading (layer) axis at a time into its device buffer, so that the host never holds it whole
# beside the device copy (the largest leaf of gpt-oss-20b: 3.2 GB).
PIECEWISE_VALUES = 1 << 24

# XLA:CPU adopts a host array this aligned as its device buffer instead of copying it.
CPU_ALIGNMENT = 64


def _values(shape: tuple[int, ...], index: Index) -> int:
    return math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape))


@functools.partial(jax.jit, donate_argnums=0)
def _set_row(block: jax.Array, row: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(block, row, i, 0)


def _place_by_rows(
    shape: tuple[int, ...], index: Index, read: Callable[[Index], np.ndarray], device
) -> jax.Array:
    """A device's block of the array, filled a row (layer) at a time. On a CPU device the buffer is
    host memory: the rows fill an aligned host array that jax adopts without a copy (a device
    buffer written by `dynamic_update_slice` and then bitcast would be copied, and XLA:CPU updates
    FP8 element by element, 100x slower). Elsewhere each row is written into the donated device
    buffer in place."""
    rows = range(*index[0].indices(shape[0]))
    block = None
    for i, r in enumerate(rows):
        value = read((slice(r, r + 1), *index[1:]))
        if _adopts_host_arrays(device):
            if block is None:
                block = _aligned_empty((len(rows), *value.shape[1:]), value.dtype)
            block[i] = value[0]
            continue
        if block is None:
            block = jnp.zeros((len(rows), *value.shape[1:]), value.dtype, device=device)
        block = _set_row(block, jax.device_put(value, device), np.int32(i))
    return jax.device_put(block, device)


def _adopts_host_arrays(device) -> bool:
    return device.platform == "cpu"


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    n_bytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(n_bytes + CPU_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % CPU_ALIGNMENT
    return raw[start : start + n_bytes].view(dtype).reshape(shape)


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


def _block(
    index: Index,
    shape: tuple[int, ...],
    maps: list[TensorMap],
    plan: hf.Plan,
    updates: dict[str, list[Update]],
    open_files: hf.OpenFiles,
) -> np.ndarray:
    """One device's block of a leaf: the TensorMaps whose (layer[, expert]) fall in the block's
    stacked dims, each cut to the block's inner dims."""
    stacked = [range(*s.indices(n)) for s, n in zip(index, shape[: len(maps[0].index)])]
    inner = index[len(stacked) :]
    block_shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
    block = None
    for m in maps:
        if not all(i in r for i, r in zip(m.index, stacked)):
            continue
        value = _tensor_block(m, inner, plan, updates.get(m.hf_name, []), open_files)
        if block is None:
            block = np.empty(block_shape, value.dtype)
        block[tuple(r.index(i) for i, r in zip(m.index, stacked))] = value
    assert block is not None, "every block holds at least one tensor"
    return block


def _native_reader(
    shape: tuple[int, ...],
    maps: list[TensorMap],
    plan: hf.Plan,
    open_files,
    scheme: quant.Scheme,
    scales: bool,
) -> Callable[[Index], np.ndarray]:
    """frozen_dtype=native: a device's block of a quantised stack (values, or their scales), each
    layer's (expert's) matrix read as stored and cut to the block's inner dims."""
    n_stacked = len(maps[0].index)  # layers, or layers and experts

    def read(index: Index) -> np.ndarray:
        stacked = [range(*s.indices(n)) for s, n in zip(index, shape[:n_stacked])]
        block = None
        for m in maps:
            if all(i in r for i, r in zip(m.index, stacked)):
                value = native.read(open_files, plan, m, scheme, scales)[index[n_stacked:]]
                if block is None:
                    block = np.empty((*map(len, stacked), *value.shape), value.dtype)
                block[tuple(r.index(i) for i, r in zip(m.index, stacked))] = value
        assert block is not None, "every block holds at least one matrix"
        return block

    return read


def _tensor_block(
    m: TensorMap, inner: Index, plan: hf.Plan, updates: list[Update], open_files: hf.OpenFiles
) -> np.ndarray:
    """Tensor `m` in our layout and dtype, restricted to `inner`, adapter updates applied."""
    use = plan.where[m.hf_name]
    hf_index = None if updates else _direct_index(m, use, inner)
    if hf_index is not None:
        stored = open_files(use.file).get_slice(use.key)
        # hf._part's shape check, on a stand-in of the stored shape that holds no data
        hf._part(
            np.broadcast_to(np.zeros((), np.uint8), tuple(stored.get_shape())), use, use.file, m
        )
        value = hf._read(open_files, plan, use, rows=hf_index[0])[(slice(None), *hf_index[1:])]
        block_shape = tuple(len(range(*s.indices(n))) for s, n in zip(inner, m.shape))
        return hf.ours(dataclasses.replace(m, shape=block_shape), value)
    if use.fused is None:
        tensor = hf._read(open_files, plan, use)
    else:  # only this expert's rows of the fused [E, ...] tensor
        tensor = hf._read(open_files, plan, use, rows=slice(use.expert, use.expert + 1))
        use = use._replace(expert=0)
    value = hf.ours(m, hf._part(tensor, use, use.file, m))
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

"""Device mesh and logical-axis sharding rules.

Every parameter and main activation names its axes logically ("expert", "embed", "act_batch", ...);
`RULES` maps each logical name onto mesh axes. The mesh always has the four axes
`data`, `fsdp`, `expert`, `tensor` (size 1 where unused), so one rules table serves every shape.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over

# logical axis -> mesh axis (or tuple of axes); names absent here are replicated.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    # activations
    "act_batch": BATCH_AXES,
    "act_heads": "tensor",
    "act_vocab": "tensor",
}


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes MESH_AXES; `shape` gives the size of some of them (others are 1)."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
    sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    devices = list(devices if devices is not None else jax.devices())
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def logical_to_spec(
    axes: Sequence[str | None], mesh_shape: Mapping[str, int] | None = None
) -> PartitionSpec:
    """PartitionSpec for logical axes. Mesh axes of size 1 are dropped, and a mesh axis is used
    at most once per array (the first logical axis that claims it wins)."""
    used: set[str] = set()
    out: list[Any] = []
    for name in axes:
        target = RULES.get(name) if name else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        keep = tuple(
            t for t in targets if t not in used and (mesh_shape is None or mesh_shape.get(t, 1) > 1)
        )
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return PartitionSpec(*out)


def current_mesh_shape() -> dict[str, int]:
    """Axis sizes of the mesh set with `jax.set_mesh` (empty outside one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(mesh.shape)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes; a no-op outside a mesh."""
    shape = current_mesh_shape()
    if not shape or math.prod(shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, shape))


def param_shardings(axes_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of logical-axes tuples (see model.params.param_axes)."""
    shape = dict(mesh.shape)
    return jax.tree.map(
        lambda axes: NamedSharding(mesh, logical_to_spec(axes, shape)),
        axes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def from_process_rows(
    tree: Any, rows_sharding: NamedSharding | None, global_shape: tuple[int, ...]
) -> Any:
    """Global arrays of `global_shape` from this process's rows of them (numpy leaves); plain device
    arrays when there is no mesh."""
    if rows_sharding is None:
        return jax.tree.map(jnp.asarray, tree)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(rows_sharding, x, global_shape), tree
    )


def to_host(tree: Any) -> Any:
    """numpy copies of a tree of arrays; arrays spread over several processes are gathered first
    (a collective: in a multi-process run every process must call this)."""
    from jax.experimental import multihost_utils

    return jax.tree.map(
        lambda x: np.asarray(
            x
            if not isinstance(x, jax.Array) or x.is_fully_addressable
            else multihost_utils.process_allgather(x, tiled=True)
        ),
        tree,
    )


def indivisible(
    shape: Sequence[int], axes: Sequence[str | None], mesh_shape: Mapping[str, int]
) -> tuple[str, int, int] | None:
    """(mesh axis, its size, the dim's index) of the first dim its mesh axes do not split evenly."""
    for i, (dim, entry) in enumerate(zip(shape, logical_to_spec(axes, mesh_shape))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = math.prod(mesh_shape[n] for n in names)
        if names and dim % size:
            return names[0], size, i
    return None


def on_mesh(mesh: Mesh | None):
    """`jax.set_mesh(mesh)`, or nothing without a mesh."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def rows_multiple(mesh: Mesh | None, expert_parallel: str = "psum") -> int:
    """Rows a batch must be a multiple of on `mesh`: the batch axes' size (times `expert`, whose
    all_to_all exchange splits rows over it too)."""
    if mesh is None:
        return 1
    shape = dict(mesh.shape)
    return math.prod(shape[a] for a in BATCH_AXES) * (
        shape["expert"] if expert_parallel == "all_to_all" else 1
    )


def place_rows(tree: Any, mesh: Mesh | None) -> Any:
    """Arrays [B, ...] (one process holds all rows) split over the mesh's batch axes; plain device arrays
    without a mesh."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    shape = dict(mesh.shape)
    return jax.tree.map(
        lambda x: jax.device_put(
            x,
            NamedSharding(
                mesh, logical_to_spec(("act_batch",) + (None,) * (np.ndim(x) - 1), shape)
            ),
        ),
        tree,
    )


def shard_params(params: Any, axes_tree: Any, mesh: Mesh) -> Any:
    """Place params on the mesh according to their logical axes."""
    return jax.device_put(params, param_shardings(axes_tree, mesh))

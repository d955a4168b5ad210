"""The MoE feed-forward block: router, routed experts (optionally expert-parallel), shared experts.

Expert parallelism: under a mesh (`jax.set_mesh`) whose `expert` axis is larger than 1, the routed
experts run inside `jax.shard_map`. Each device holds E / n_expert experts and the tokens of its
batch shard, computes only its own experts' contributions, and a psum over `expert` adds them up.
(Left to XLA's automatic partitioning, the scatter dispatch stalls on simulated CPU devices.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from esft_jax import sharding
from esft_jax.model.config import ModelConfig
from esft_jax.model.experts import routed_experts
from esft_jax.model.router import RouterOutput, route


class MoEOutput(NamedTuple):
    y_btd: jax.Array
    routing: RouterOutput  # fields shaped [B, T, ...]
    dropped: jax.Array  # int32 scalar: assignments that overflowed a capacity buffer


def swiglu(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    """down(silu(x @ gate) * (x @ up)) for a plain MLP with weights gate/up [d, f], down [f, d]."""
    dt = x.dtype
    h = jax.nn.silu(x @ p["gate"].astype(dt)) * (x @ p["up"].astype(dt))
    return h @ p["down"].astype(dt)


def _expert_parallel(x_btd, ids_btk, w_btk, experts, cfg: ModelConfig, mesh_shape: dict[str, int]):
    """Routed experts with the expert axis split over the mesh's `expert` axis (shard_map + psum)."""
    n_shards = mesh_shape["expert"]
    if cfg.n_routed_experts % n_shards:
        raise ValueError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by the "
                         f"expert mesh axis ({n_shards})")
    batch = tuple(a for a in sharding.BATCH_AXES if mesh_shape.get(a, 1) > 1) or None
    reduce_axes = ("expert", *(batch or ()))

    def local(x, ids, w, p):
        b, t, d = x.shape
        e_local = p["gate"].shape[0]
        local_ids = ids - jax.lax.axis_index("expert") * e_local
        local_ids = jnp.where((local_ids >= 0) & (local_ids < e_local), local_ids, e_local)
        y, dropped = routed_experts(x.reshape(b * t, d), local_ids.reshape(b * t, -1),
                                    w.reshape(b * t, -1), p, cfg.moe_strategy, cfg.capacity_factor)
        return jax.lax.psum(y.reshape(b, t, d), "expert"), jax.lax.psum(dropped, reduce_axes)

    act, per_expert = P(batch, None, None), P("expert", None, None)
    fn = jax.shard_map(local, in_specs=(act, act, act, {k: per_expert for k in experts}),
                       out_specs=(act, P()))
    return fn(x_btd, ids_btk, w_btk, experts)


def moe_block(p: dict[str, Any], x_btd: jax.Array, cfg: ModelConfig) -> MoEOutput:
    """x [B, T, d] (already normed) -> routed + shared expert output [B, T, d], and the routing."""
    b, t, d = x_btd.shape
    r = route(x_btd.reshape(b * t, d), p["router"], cfg, p.get("router_bias"))
    routing = RouterOutput(*(a.reshape(b, t, -1) for a in r))
    mesh_shape = sharding.current_mesh_shape()
    if mesh_shape.get("expert", 1) > 1:
        y, dropped = _expert_parallel(x_btd, routing.expert_ids, routing.weights, p["experts"], cfg, mesh_shape)
    else:
        y, dropped = routed_experts(x_btd.reshape(b * t, d), r.expert_ids, r.weights, p["experts"],
                                    cfg.moe_strategy, cfg.capacity_factor)
        y = y.reshape(b, t, d)
    y = y.astype(x_btd.dtype)
    if "shared" in p:
        y = y + swiglu(x_btd, p["shared"])
    return MoEOutput(y, routing, dropped)

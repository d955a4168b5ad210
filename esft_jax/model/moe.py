"""The MoE feed-forward block: router, routed experts (optionally expert-parallel), shared experts.

Expert overrides: `p["override"] = {"ids": [S] int32, "gate"/"up": [S, d, f], "down": [S, f, d]}`
gives S experts of the layer (ids; -1 = an unused slot) weights that replace their rows of the
stacked `experts`. Tokens routed to an overridden expert are computed with the override weights,
the rest with the stacked ones; routing is unchanged. Fine-tuning a few experts differentiates only
the small override arrays: the stacked experts stay constants, so no weight gradient is computed
for them (see train/trainable.py).

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


def _split_overridden(ids_btk: jax.Array, override_ids_s: jax.Array, num_stacked: int):
    """(ids for the stacked experts, overridden ones set to `num_stacked`: "elsewhere";
    override slot of each assignment, S where the expert is not overridden)."""
    match = ids_btk[..., None] == override_ids_s  # [B, T, k, S]
    overridden = match.any(-1)
    stacked = jnp.where(overridden, num_stacked, ids_btk)
    slots = jnp.where(overridden, jnp.argmax(match, -1), override_ids_s.shape[0]).astype(jnp.int32)
    return stacked, slots


def _routed(x_btd, ids_btk, w_btk, experts, cfg: ModelConfig):
    """Routed-expert output on one device -> (y [B, T, d] float32, dropped assignments)."""
    b, t, d = x_btd.shape
    y, dropped = routed_experts(x_btd.reshape(b * t, d), ids_btk.reshape(b * t, -1), w_btk.reshape(b * t, -1),
                                experts, cfg.moe_strategy, cfg.capacity_factor)
    return y.reshape(b, t, d), dropped


def _override_weights(override: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: v for k, v in override.items() if k != "ids"}


def _expert_parallel(x_btd, ids_btk, w_btk, experts, override, cfg: ModelConfig, mesh_shape: dict[str, int]):
    """Routed experts with the expert axis split over the mesh's `expert` axis (shard_map + psum).
    Overrides are few: every device holds them all and adds their (identical) share after the psum."""
    n_shards = mesh_shape["expert"]
    if cfg.n_routed_experts % n_shards:
        raise ValueError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by the "
                         f"expert mesh axis ({n_shards})")
    batch = tuple(a for a in sharding.BATCH_AXES if mesh_shape.get(a, 1) > 1) or None

    def local(x, ids, w, p, ov):
        e_local = p["gate"].shape[0]
        if ov is not None:
            ids, slots = _split_overridden(ids, ov["ids"], cfg.n_routed_experts)
        local_ids = ids - jax.lax.axis_index("expert") * e_local
        local_ids = jnp.where((local_ids >= 0) & (local_ids < e_local), local_ids, e_local)
        y, dropped = _routed(x, local_ids, w, p, cfg)
        y, dropped = jax.lax.psum(y, "expert"), jax.lax.psum(dropped, "expert")
        if ov is not None:
            y_ov, dropped_ov = _routed(x, slots, w, _override_weights(ov), cfg)
            y, dropped = y + y_ov, dropped + dropped_ov
        return y, (jax.lax.psum(dropped, batch) if batch else dropped)

    act, per_expert = P(batch, None, None), P("expert", None, None)
    ov_specs = None if override is None else {k: P() for k in override}
    fn = jax.shard_map(local, in_specs=(act, act, act, {k: per_expert for k in experts}, ov_specs),
                       out_specs=(act, P()), check_vma=False)  # the blocked strategy's lax.cond
    return fn(x_btd, ids_btk, w_btk, experts, override)


def moe_block(p: dict[str, Any], x_btd: jax.Array, cfg: ModelConfig) -> MoEOutput:
    """x [B, T, d] (already normed) -> routed + shared expert output [B, T, d], and the routing."""
    b, t, d = x_btd.shape
    r = route(x_btd.reshape(b * t, d), p["router"], cfg, p.get("router_bias"))
    routing = RouterOutput(*(a.reshape(b, t, -1) for a in r))
    mesh_shape = sharding.current_mesh_shape()
    override = p.get("override")
    if mesh_shape.get("expert", 1) > 1:
        y, dropped = _expert_parallel(x_btd, routing.expert_ids, routing.weights, p["experts"], override, cfg,
                                      mesh_shape)
    elif override is None:
        y, dropped = _routed(x_btd, routing.expert_ids, routing.weights, p["experts"], cfg)
    else:
        ids, slots = _split_overridden(routing.expert_ids, override["ids"], cfg.n_routed_experts)
        y, dropped = _routed(x_btd, ids, routing.weights, p["experts"], cfg)
        y_ov, dropped_ov = _routed(x_btd, slots, routing.weights, _override_weights(override), cfg)
        y, dropped = y + y_ov, dropped + dropped_ov
    y = y.astype(x_btd.dtype)
    if "shared" in p:
        y = y + swiglu(x_btd, p["shared"])
    return MoEOutput(y, routing, dropped)

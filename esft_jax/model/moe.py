"""The MoE feed-forward block: router, routed experts (optionally expert-parallel), shared experts
(optionally behind a sigmoid gate).

Expert overrides: `p["override"] = {"ids": [S] int32, "gate"/"up": [S, d, f], "down": [S, f, d]}`
(+ the biases, where the experts have them) gives S experts of the layer (ids; -1 = an unused slot)
weights that replace their rows of the stacked `experts`. Tokens routed to an overridden expert are
computed with the override weights, the rest with the stacked ones; routing is unchanged. With the
blocked strategy both go through one pass, the override rows numbered as experts E .. E + S - 1;
otherwise a second pass takes the overrides' assignments. Fine-tuning a few experts differentiates
only the small override arrays: the stacked experts stay constants, so no weight gradient is
computed for them (see train/esft.py). For a batch that mixes several, the override holds A sets:
`"ids"` [A, S] and the weights [A, S, ...], and `moe_block`'s `override_set_b` [B] picks each batch
row's set. The set index is batch data, an argument beside the activations, not a parameter
(serve/bank.py serves one adapter per set).

Expert parallelism: under a mesh (`jax.set_mesh`) whose `expert` axis is larger than 1, the routed
experts run inside `jax.shard_map`; each device holds E / n_expert experts. Two exchanges
(`cfg.expert_parallel`; XLA's automatic partitioning of the dispatch stalls on simulated CPU devices):
- "psum": each device takes all tokens of its batch shard, computes its own experts' share, and a
  psum over `expert` adds the shares up (traffic: the activations, every layer).
- "all_to_all": tokens are split over `expert` too; each device sends every assignment to the device
  holding its expert in a fixed-size buffer (`jax.lax.all_to_all`: `ragged_all_to_all` does not exist
  on CPU), computes, and sends the results back. Buffer rows per device pair: N*k (dropless) or
  ceil(capacity_factor * N * k / n_expert), overflow dropped and counted.

`cfg.router_grad="dense"` (DenseMixer, model/router_grad.py): the routed weights enter the expert
paths above as constants, and the router's gradient comes from the dense mixture over every expert
(the same forward output), on one device or under either exchange.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from esft_jax import sharding
from esft_jax.model.config import ModelConfig
from esft_jax.model.experts import GLU, resolve_strategy, routed_experts, sort_by_expert
from esft_jax.model.router import RouterOutput, route
from esft_jax.model.router_grad import dense_router_grad


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
    override slot of each assignment, S where the expert is not overridden). The override ids are
    [S], or [B, 1, 1, S]: each batch row's set."""
    match = ids_btk[..., None] == override_ids_s  # [B, T, k, S]
    overridden = match.any(-1)
    stacked = jnp.where(overridden, num_stacked, ids_btk)
    slots = jnp.where(overridden, jnp.argmax(match, -1), override_ids_s.shape[-1]).astype(jnp.int32)
    return stacked, slots


def _inert_where_unused(rows: jax.Array, used: jax.Array) -> jax.Array:
    """Override rows [S, ...] ([A, S, ...]) as they are, but with no gradient for the unused slots
    (used [S] ([A, S]) False): no token reaches them, and even a NaN in the rest of the layer's
    gradient leaves theirs exactly zero (ESFT trains the rows in place: train/esft.py). The
    select of an array with itself compiles to nothing."""
    mask = used.reshape(*used.shape, *(1,) * (rows.ndim - used.ndim))
    return jnp.where(mask, rows, jax.lax.stop_gradient(rows))


def _override_slots(
    ids_btk: jax.Array,
    override: dict[str, jax.Array],
    set_b: jax.Array | None,
    num_stacked: int,
):
    """(stacked ids, override slot of each assignment (the row count: none), the override rows).
    With A sets (ids [A, S]) row b looks up set set_b[b], and the sets' rows [A, S, ...] are one
    list of A * S rows."""
    if (set_b is None) != (override["ids"].ndim == 1):
        raise ValueError("a set per row goes with expert overrides of A sets (ids [A, S]) only")
    used = override["ids"] >= 0
    rows = {k: _inert_where_unused(v, used) for k, v in override.items() if k != "ids"}
    if set_b is None:
        return (*_split_overridden(ids_btk, override["ids"], num_stacked), rows)
    ids_as = override["ids"]
    n_sets, s = ids_as.shape
    stacked, slot = _split_overridden(ids_btk, ids_as[set_b][:, None, None, :], num_stacked)
    slots = jnp.where(slot < s, set_b[:, None, None] * s + slot, n_sets * s).astype(jnp.int32)
    return stacked, slots, {k: v.reshape(n_sets * s, *v.shape[2:]) for k, v in rows.items()}


def expert_glu(cfg: ModelConfig) -> GLU:
    return GLU(cfg.expert_act, cfg.swiglu_limit, cfg.swiglu_alpha)


def _routed(
    x_btd, ids_btk, w_btk, experts, cfg: ModelConfig, capacity_factor: float | None, extra=None
):
    """Routed-expert output on one device -> (y [B, T, d] float32, dropped assignments). extra: more
    experts numbered on from the stack's (routed_experts; the blocked strategy)."""
    b, t, d = x_btd.shape
    y, dropped = routed_experts(
        x_btd.reshape(b * t, d),
        ids_btk.reshape(b * t, -1),
        w_btk.reshape(b * t, -1),
        experts,
        "blocked" if extra is not None else cfg.moe_strategy,
        capacity_factor,
        act=expert_glu(cfg),
        extra=extra,
        scheme=cfg.expert_scheme,
    )
    return y.reshape(b, t, d), dropped


def _with_overrides(
    stacked_pass: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    x_btd,
    ids_btk,
    w_btk,
    override: dict[str, jax.Array] | None,
    set_b: jax.Array | None,
    cfg: ModelConfig,
    capacity_factor: float | None,
    stacked: dict[str, jax.Array] | None = None,
):
    """stacked_pass(ids [B, T, k]) -> (y [B, T, d] float32, dropped) over the stacked experts, plus the
    overrides' share: their assignments are masked out of the stacked pass (id E) and computed from the
    override rows instead (row b's from set set_b[b] where the override holds sets). Under expert
    parallelism it runs inside shard_map (overrides replicated): each device adds the overrides'
    share of its own tokens. Given the `stacked` experts (one device) and the blocked strategy, one
    pass takes both."""
    if override is None:
        return stacked_pass(ids_btk)
    stacked_ids, slots, rows = _override_slots(ids_btk, override, set_b, cfg.n_routed_experts)
    quantized = cfg.expert_scheme is not None
    if stacked is not None and resolve_strategy(cfg.moe_strategy, quantized=quantized) == "blocked":
        # one pass: the override rows are experts E .. E + S - 1 beside the stack
        n_rows = next(iter(rows.values())).shape[0]
        ids = jnp.where(slots < n_rows, cfg.n_routed_experts + slots, ids_btk)
        return _routed(x_btd, ids, w_btk, stacked, cfg, None, extra=rows)
    y, dropped = stacked_pass(stacked_ids)
    y_ov, dropped_ov = _routed(x_btd, slots, w_btk, rows, cfg, capacity_factor)
    return y + y_ov, dropped + dropped_ov


def _on_expert_shards(local, act: P, x_btd, ids_btk, w_btk, experts, override, set_b):
    """local(x, ids, w, experts, override, set_b) -> (y, dropped) inside shard_map: activations
    split as `act`, experts over `expert`, overrides replicated, the per-row set index split like
    the rows; y comes back split as `act`, dropped replicated.
    check_vma=False: the block loops start from fresh zeros (and `spill` may return them)."""
    ov_specs = None if override is None else {k: P() for k in override}
    fn = jax.shard_map(
        local,
        in_specs=(
            act,
            act,
            act,
            {k: P("expert") for k in experts},
            ov_specs,
            None if set_b is None else P(act[0]),
        ),
        out_specs=(act, P()),
        check_vma=False,
    )
    return fn(x_btd, ids_btk, w_btk, experts, override, set_b)


def _expert_parallel(
    x_btd, ids_btk, w_btk, experts, override, set_b, cfg: ModelConfig, mesh_shape: dict[str, int]
):
    """Routed experts with the expert axis split over the mesh's `expert` axis (shard_map + psum).
    Overrides are few: every device holds them all and adds their (identical) share after the psum."""
    n_shards = mesh_shape["expert"]
    if cfg.n_routed_experts % n_shards:
        raise ValueError(
            f"n_routed_experts={cfg.n_routed_experts} is not divisible by the "
            f"expert mesh axis ({n_shards})"
        )
    batch = tuple(a for a in sharding.BATCH_AXES if mesh_shape.get(a, 1) > 1) or None

    def local(x, ids, w, p, ov, sets):
        e_local = p["gate"].shape[0]

        def own_experts_summed(ids_btk):
            local_ids = ids_btk - jax.lax.axis_index("expert") * e_local
            local_ids = jnp.where((local_ids >= 0) & (local_ids < e_local), local_ids, e_local)
            y, dropped = _routed(x, local_ids, w, p, cfg, cfg.capacity_factor)
            return jax.lax.psum(y, "expert"), jax.lax.psum(dropped, "expert")

        y, dropped = _with_overrides(
            own_experts_summed, x, ids, w, ov, sets, cfg, cfg.capacity_factor
        )
        return y, (jax.lax.psum(dropped, batch) if batch else dropped)

    return _on_expert_shards(
        local, P(batch, None, None), x_btd, ids_btk, w_btk, experts, override, set_b
    )


def _all_to_all(
    x_btd, ids_btk, w_btk, experts, override, set_b, cfg: ModelConfig, mesh_shape: dict[str, int]
):
    """Expert parallelism by token exchange: see the module docstring."""
    n_shards = mesh_shape["expert"]
    batch = tuple(a for a in sharding.BATCH_AXES if mesh_shape.get(a, 1) > 1)
    if x_btd.shape[0] % math.prod([mesh_shape[a] for a in batch] + [n_shards]):
        raise ValueError(
            f"expert_parallel='all_to_all' splits the batch ({x_btd.shape[0]} rows) over "
            f"{(*batch, 'expert')}; it must divide evenly"
        )

    def local(x, ids, w, p, ov, sets):
        def exchange(ids_btk):
            return _exchange(x, ids_btk, w, p, cfg, n_shards)

        # The capacity factor sizes the exchange buffers: the expert computations are dropless.
        y, dropped = _with_overrides(exchange, x, ids, w, ov, sets, cfg, None)
        return y, jax.lax.psum(dropped, (*batch, "expert"))

    return _on_expert_shards(
        local, P((*batch, "expert"), None, None), x_btd, ids_btk, w_btk, experts, override, set_b
    )


def _exchange(x_btd, ids_btk, w_btk, experts, cfg: ModelConfig, n_shards: int):
    """One device's assignments (id E: not sent) to their experts' devices in fixed-size buffers,
    through the experts there, and back -> (y [B, T, d] float32, this device's dropped assignments)."""
    b, t, d = x_btd.shape
    k, e_local = ids_btk.shape[-1], experts["gate"].shape[0]
    x_nd, ids_a, w_nk = x_btd.reshape(b * t, d), ids_btk.reshape(-1), w_btk.reshape(b * t, k)
    rows = (
        math.ceil(cfg.capacity_factor * b * t * k / n_shards) if cfg.capacity_factor else b * t * k
    )
    valid = ids_a < cfg.n_routed_experts
    dest = jnp.where(valid, ids_a // e_local, n_shards)  # n_shards: overridden, not sent
    # each assignment's row of its destination's buffer (>= rows: dropped)
    rank = jnp.where(valid, sort_by_expert(dest, n_shards)[2], rows)
    tok = jnp.arange(b * t * k) // k
    send = jnp.zeros((n_shards, rows, d), x_btd.dtype).at[dest, rank].set(x_nd[tok], mode="drop")
    send_ids = (
        jnp.full((n_shards, rows), e_local, jnp.int32)
        .at[dest, rank]
        .set(ids_a % e_local, mode="drop")
    )
    recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)
    recv_ids = jax.lax.all_to_all(send_ids, "expert", 0, 0, tiled=True)
    y_recv, _ = routed_experts(
        recv.reshape(-1, d),
        recv_ids.reshape(-1, 1),
        jnp.ones((n_shards * rows, 1)),
        experts,
        cfg.moe_strategy,
        act=expert_glu(cfg),
        scheme=cfg.expert_scheme,
    )
    y_back = jax.lax.all_to_all(y_recv.reshape(n_shards, rows, d), "expert", 0, 0, tiled=True)
    y_a = y_back.at[dest, rank].get(mode="fill", fill_value=0)
    y_nd = jnp.einsum("nkd,nk->nd", y_a.reshape(b * t, k, d), w_nk.astype(jnp.float32))
    return y_nd.reshape(b, t, d), jnp.sum(valid & (rank >= rows)).astype(jnp.int32)


def moe_block(
    p: dict[str, Any], x_btd: jax.Array, cfg: ModelConfig, override_set_b: jax.Array | None = None
) -> MoEOutput:
    """x [B, T, d] (already normed) -> routed + shared expert output [B, T, d], and the routing.
    override_set_b [B] int32: the override set of each row, where p["override"] holds A sets."""
    b, t, d = x_btd.shape
    r = route(
        x_btd.reshape(b * t, d), p["router"], cfg, p.get("router_bias"), p.get("router_correction")
    )
    routing = RouterOutput(*(a.reshape(b, t, -1) for a in r))
    # router_grad="dense": the router learns from the dense mixture alone (model/router_grad.py)
    dense_grad = cfg.router_grad == "dense"
    weights = jax.lax.stop_gradient(routing.weights) if dense_grad else routing.weights
    mesh_shape = sharding.current_mesh_shape()
    override = p.get("override")
    if mesh_shape.get("expert", 1) > 1:
        exchange = _all_to_all if cfg.expert_parallel == "all_to_all" else _expert_parallel
        y, dropped = exchange(
            x_btd,
            routing.expert_ids,
            weights,
            p["experts"],
            override,
            override_set_b,
            cfg,
            mesh_shape,
        )
    else:

        def stacked_pass(ids_btk):
            return _routed(x_btd, ids_btk, weights, p["experts"], cfg, cfg.capacity_factor)

        y, dropped = _with_overrides(
            stacked_pass,
            x_btd,
            routing.expert_ids,
            weights,
            override,
            override_set_b,
            cfg,
            cfg.capacity_factor,
            stacked=p["experts"],
        )
    if dense_grad:
        y = dense_router_grad(y, r, x_btd, p["experts"], override, expert_glu(cfg), cfg)
    y = y.astype(x_btd.dtype)
    if "shared" in p:
        shared = swiglu(x_btd, p["shared"])
        if "shared_gate" in p:  # Qwen2-MoE: a per-token sigmoid gate on the shared expert
            shared = shared * jax.nn.sigmoid(x_btd @ p["shared_gate"].astype(x_btd.dtype))
        y = y + shared
    return MoEOutput(y, routing, dropped)

"""Routed-expert computation: y = sum_k w_k * SwiGLU_{e_k}(x), behind one function, three strategies.

- `dense`: every expert on every token, then a weighted combine. O(E) work: the reference path.
- `capacity`: tokens scattered into a per-expert buffer [E, C, d], batched matmuls, gathered back.
  C = N (every token fits: dropless) unless a capacity factor is given; overflow is dropped and
  counted. Fast on CPU, where XLA has no grouped matmul.
- `ragged`: assignments sorted by expert and a grouped matmul (`jax.lax.ragged_dot`): dropless with
  no padding; the right path on GPU/TPU, a slow dense emulation on XLA:CPU.
`auto` picks `ragged` on GPU/TPU and `capacity` on CPU.

An expert id equal to E means "not on this shard" (used by expert parallelism, see moe.py): such an
assignment contributes nothing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ExpertWeights = dict[str, jax.Array]  # gate, up [E, d, f]; down [E, f, d]


def resolve_strategy(strategy: str) -> str:
    if strategy != "auto":
        return strategy
    return "capacity" if jax.default_backend() == "cpu" else "ragged"


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Buffer rows per expert: N when dropless, else ceil(cf * N * k / E), at most N."""
    if capacity_factor is None:
        return num_tokens
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * k / num_experts)))


def _dense(x_nd, ids_nk, w_nk, p: ExpertWeights):
    e = p["gate"].shape[0]
    h_enf = jax.nn.silu(jnp.einsum("nd,edf->enf", x_nd, p["gate"])) * jnp.einsum("nd,edf->enf", x_nd, p["up"])
    out_end = jnp.einsum("enf,efd->end", h_enf, p["down"])
    combine_ne = jnp.einsum("nke,nk->ne", jax.nn.one_hot(ids_nk, e, dtype=jnp.float32), w_nk)
    y = jnp.einsum("end,ne->nd", out_end.astype(jnp.float32), combine_ne)
    return y, jnp.zeros((), jnp.int32)


def _sort_by_expert(ids_a: jax.Array, num_experts: int):
    """Stable sort of A assignments by expert id; returns order, per-expert counts [E+1], and each
    assignment's rank within its expert (in the original order)."""
    order = jnp.argsort(ids_a, stable=True)
    counts = jnp.bincount(ids_a, length=num_experts + 1)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(ids_a.shape[0]) - starts[ids_a[order]]
    rank = jnp.zeros_like(ids_a).at[order].set(rank_sorted)
    return order, counts, rank


def _capacity(x_nd, ids_nk, w_nk, p: ExpertWeights, capacity_factor: float | None):
    n, k = ids_nk.shape
    e = p["gate"].shape[0]
    c = capacity(n, k, e, capacity_factor)
    ids_a = ids_nk.reshape(-1)
    _, _, slot_a = _sort_by_expert(ids_a, e)
    tok_a = jnp.arange(n * k) // k
    # Out-of-range rows (slot >= C, or id == E: not on this shard) are dropped by the scatter.
    buf_ecd = jnp.zeros((e, c, x_nd.shape[1]), x_nd.dtype).at[ids_a, slot_a].set(x_nd[tok_a], mode="drop")
    h_ecf = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf_ecd, p["gate"])) * jnp.einsum("ecd,edf->ecf", buf_ecd, p["up"])
    out_ecd = jnp.einsum("ecf,efd->ecd", h_ecf, p["down"])
    y_ad = out_ecd.at[ids_a, slot_a].get(mode="fill", fill_value=0)
    y = jnp.einsum("nkd,nk->nd", y_ad.reshape(n, k, -1).astype(jnp.float32), w_nk)
    dropped = jnp.sum((slot_a >= c) & (ids_a < e)).astype(jnp.int32)
    return y, dropped


def _ragged(x_nd, ids_nk, w_nk, p: ExpertWeights):
    n, k = ids_nk.shape
    e = p["gate"].shape[0]
    ids_a = ids_nk.reshape(-1)
    order, counts, _ = _sort_by_expert(ids_a, e)
    x_ad = x_nd[order // k]  # rows sorted by expert; assignments to id E come last, outside all groups
    group_sizes = counts[:e].astype(jnp.int32)
    h_af = jax.nn.silu(jax.lax.ragged_dot(x_ad, p["gate"], group_sizes)) * jax.lax.ragged_dot(x_ad, p["up"], group_sizes)
    out_sorted = jax.lax.ragged_dot(h_af, p["down"], group_sizes)
    out_ad = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
    w_nk = jnp.where(ids_nk < e, w_nk, 0.0)
    y = jnp.einsum("nkd,nk->nd", out_ad.reshape(n, k, -1).astype(jnp.float32), w_nk)
    return y, jnp.zeros((), jnp.int32)


def routed_experts(x_nd: jax.Array, ids_nk: jax.Array, weights_nk: jax.Array, p: ExpertWeights,
                   strategy: str = "auto", capacity_factor: float | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """x [N, d], ids/weights [N, k] -> (y [N, d] float32, dropped assignments: int32 scalar)."""
    p = {name: w.astype(x_nd.dtype) for name, w in p.items()}
    weights_nk = weights_nk.astype(jnp.float32)
    strategy = resolve_strategy(strategy)
    if strategy == "dense":
        return _dense(x_nd, ids_nk, weights_nk, p)
    if strategy == "capacity":
        return _capacity(x_nd, ids_nk, weights_nk, p, capacity_factor)
    if strategy == "ragged":
        return _ragged(x_nd, ids_nk, weights_nk, p)
    raise ValueError(f"unknown MoE strategy {strategy!r}")

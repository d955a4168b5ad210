"""Routed-expert computation: y = sum_k w_k * SwiGLU_{e_k}(x), behind one function, three strategies.

- `dense`: every expert on every token, then a weighted combine. O(E) work: the reference path.
- `capacity`: tokens scattered into a per-expert buffer [E, C, d], batched matmuls, gathered back.
  C = N (every token fits: dropless, as much work as `dense`) unless a capacity factor is given;
  overflow is dropped and counted.
- `blocked`: dropless. Assignments sorted by expert, each expert's rows padded to a multiple of
  `BLOCK` rows, then a loop over the blocks, each one expert's SwiGLU on BLOCK rows; unused blocks
  are skipped. Work = active FLOPs + padding (< E x BLOCK rows). Custom VJP: the backward loop adds
  each block's weight gradient into its expert in place. The CPU default (XLA:CPU has no grouped matmul).
- `ragged`: assignments sorted by expert and a grouped matmul (`jax.lax.ragged_dot`): dropless with
  no padding; the right path on GPU/TPU, a slow dense emulation on XLA:CPU.
`auto` picks `ragged` on GPU/TPU and `blocked` on CPU.

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
    return "blocked" if jax.default_backend() == "cpu" else "ragged"


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


def sort_by_expert(ids_a: jax.Array, num_experts: int):
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
    _, _, slot_a = sort_by_expert(ids_a, e)
    tok_a = jnp.arange(n * k) // k
    # Out-of-range rows (slot >= C, or id == E: not on this shard) are dropped by the scatter.
    buf_ecd = jnp.zeros((e, c, x_nd.shape[1]), x_nd.dtype).at[ids_a, slot_a].set(x_nd[tok_a], mode="drop")
    h_ecf = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf_ecd, p["gate"])) * jnp.einsum("ecd,edf->ecf", buf_ecd, p["up"])
    out_ecd = jnp.einsum("ecf,efd->ecd", h_ecf, p["down"])
    y_ad = out_ecd.at[ids_a, slot_a].get(mode="fill", fill_value=0)
    y = jnp.einsum("nkd,nk->nd", y_ad.reshape(n, k, -1).astype(jnp.float32), w_nk)
    dropped = jnp.sum((slot_a >= c) & (ids_a < e)).astype(jnp.int32)
    return y, dropped


BLOCK = 32  # rows per block of the `blocked` strategy (benchmarks/moe_layer.py: 32 beats 16/64/128 on CPU)


def _block_layout(ids_a: jax.Array, num_experts: int, block: int):
    """Row of each assignment in the block-padded sorted layout (out of range for id E), and each
    block's expert (E for an unused block). Blocks: at most A / block + E."""
    _, counts, rank = sort_by_expert(ids_a, num_experts)
    padded = -(-counts[:num_experts] // block) * block
    ends = jnp.cumsum(padded)
    num_blocks = ids_a.shape[0] // block + num_experts
    valid = ids_a < num_experts
    row_a = jnp.where(valid, (ends - padded)[jnp.where(valid, ids_a, 0)] + rank, num_blocks * block)
    expert_b = jnp.searchsorted(ends, jnp.arange(num_blocks) * block, side="right")  # E past the last one
    return row_a, expert_b, num_blocks


def _swiglu_blocks_fwd_loop(x_bcd, expert_b, g, u, dn):
    e = g.shape[0]

    def body(_, xs):
        x_cd, i = xs
        used = lambda: (jax.nn.silu(x_cd @ g[i]) * (x_cd @ u[i])) @ dn[i]  # noqa: E731
        return None, jax.lax.cond(i < e, used, lambda: jnp.zeros((x_cd.shape[0], dn.shape[2]), x_cd.dtype))

    return jax.lax.scan(body, None, (x_bcd, expert_b))[1]


@jax.custom_vjp
def _swiglu_blocks(x_bcd, expert_b, g, u, dn):
    """Block b's rows through expert expert_b[b]'s SwiGLU; blocks with expert E are zero."""
    return _swiglu_blocks_fwd_loop(x_bcd, expert_b, g, u, dn)


def _swiglu_blocks_fwd(x_bcd, expert_b, g, u, dn):
    return _swiglu_blocks_fwd_loop(x_bcd, expert_b, g, u, dn), (x_bcd, expert_b, g, u, dn)


def _swiglu_blocks_bwd(res, dy_bcd):
    x_bcd, expert_b, g, u, dn = res
    e = g.shape[0]

    def used(grads, x_cd, i, dy_cd):
        dg, du, ddn = grads
        a, b = x_cd @ g[i], x_cd @ u[i]
        sig = jax.nn.sigmoid(a)
        silu = a * sig
        dh = dy_cd @ dn[i].T
        da, db = dh * b * sig * (1 + a * (1 - sig)), dh * silu
        grads = dg.at[i].add(x_cd.T @ da), du.at[i].add(x_cd.T @ db), ddn.at[i].add((silu * b).T @ dy_cd)
        return grads, da @ g[i].T + db @ u[i].T

    def body(grads, xs):
        x_cd, i, dy_cd = xs
        return jax.lax.cond(i < e, used, lambda grads, x_cd, i, dy_cd: (grads, jnp.zeros_like(x_cd)),
                            grads, x_cd, i, dy_cd)

    zeros = (jnp.zeros_like(g), jnp.zeros_like(u), jnp.zeros_like(dn))
    (dg, du, ddn), dx_bcd = jax.lax.scan(body, zeros, (x_bcd, expert_b, dy_bcd))
    return dx_bcd, None, dg, du, ddn


_swiglu_blocks.defvjp(_swiglu_blocks_fwd, _swiglu_blocks_bwd)


def _blocked(x_nd, ids_nk, w_nk, p: ExpertWeights, block: int):
    n, k = ids_nk.shape
    e = p["gate"].shape[0]
    ids_a = ids_nk.reshape(-1)
    row_a, expert_b, num_blocks = _block_layout(ids_a, e, block)
    rows_rd = jnp.zeros((num_blocks * block, x_nd.shape[1]), x_nd.dtype).at[row_a].set(
        x_nd[jnp.arange(n * k) // k], mode="drop")
    out_rd = _swiglu_blocks(rows_rd.reshape(num_blocks, block, -1), expert_b, p["gate"], p["up"], p["down"])
    y_ad = out_rd.reshape(num_blocks * block, -1).at[row_a].get(mode="fill", fill_value=0)
    y = jnp.einsum("nkd,nk->nd", y_ad.reshape(n, k, -1).astype(jnp.float32), w_nk)
    return y, jnp.zeros((), jnp.int32)


def _ragged(x_nd, ids_nk, w_nk, p: ExpertWeights):
    n, k = ids_nk.shape
    e = p["gate"].shape[0]
    ids_a = ids_nk.reshape(-1)
    order, counts, _ = sort_by_expert(ids_a, e)
    x_ad = x_nd[order // k]  # rows sorted by expert; assignments to id E come last, outside all groups
    group_sizes = counts[:e].astype(jnp.int32)
    h_af = jax.nn.silu(jax.lax.ragged_dot(x_ad, p["gate"], group_sizes)) * jax.lax.ragged_dot(x_ad, p["up"], group_sizes)
    out_sorted = jax.lax.ragged_dot(h_af, p["down"], group_sizes)
    out_ad = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
    w_nk = jnp.where(ids_nk < e, w_nk, 0.0)
    y = jnp.einsum("nkd,nk->nd", out_ad.reshape(n, k, -1).astype(jnp.float32), w_nk)
    return y, jnp.zeros((), jnp.int32)


def routed_experts(x_nd: jax.Array, ids_nk: jax.Array, weights_nk: jax.Array, p: ExpertWeights,
                   strategy: str = "auto", capacity_factor: float | None = None, block: int = BLOCK
                   ) -> tuple[jax.Array, jax.Array]:
    """x [N, d], ids/weights [N, k] -> (y [N, d] float32, dropped assignments: int32 scalar)."""
    p = {name: jnp.asarray(w, x_nd.dtype) for name, w in p.items()}
    weights_nk = weights_nk.astype(jnp.float32)
    strategy = resolve_strategy(strategy)
    if strategy == "dense":
        return _dense(x_nd, ids_nk, weights_nk, p)
    if strategy == "capacity":
        return _capacity(x_nd, ids_nk, weights_nk, p, capacity_factor)
    if strategy == "blocked":
        return _blocked(x_nd, ids_nk, weights_nk, p, block)
    if strategy == "ragged":
        return _ragged(x_nd, ids_nk, weights_nk, p)
    raise ValueError(f"unknown MoE strategy {strategy!r}")

"""Routed-expert computation: y = sum_k w_k * MLP_{e_k}(x), behind one function, five strategies.

Each expert is a gated MLP: down(act(x @ gate + gate_bias, x @ up + up_bias)) + down_bias, with
`GLU` the activation (SwiGLU, or gpt-oss's clamped variant) and the biases optional.

- `dense`: every expert on every token, then a weighted combine. O(E) work: the reference path.
- `capacity`: tokens scattered into a per-expert buffer [E, C, d], batched matmuls, gathered back.
  C = N (every token fits: dropless, as much work as `dense`) unless a capacity factor is given;
  overflow is dropped and counted.
- `blocked`: dropless. Assignments sorted by expert, each expert's rows padded to a multiple of
  `BLOCK` rows, then a loop over the used blocks only (a dynamic trip count), each one expert's
  MLP on BLOCK rows. Work = active FLOPs + padding (< E x BLOCK rows). Custom VJP: the forward
  keeps the pre-activations, the backward adds each block's weight gradient into its expert in place
  and skips weight gradients of frozen experts (ESFT's) and input gradients of frozen inputs.
  ESFT's trained rows can ride beside the frozen stack as more experts (`extra`): one layout, one
  loop per stack. The CPU default (XLA:CPU has no grouped matmul).
- `spill`: dropless. A capacity pass (C = ceil(cf N k / E), cf = the capacity factor or 1.25) takes
  each expert's first C assignments in batched matmuls, which XLA:CPU runs faster than the block
  loop; the overflow, if any, goes through `blocked`. Where that cannot pay it is `blocked` alone:
  at trace time when C < SPILL_MIN_ROWS, at run time (`lax.cond`) when more than SPILL_MAX_OVERFLOW
  of the assignments overflow. Wins when expert loads are balanced; trained routers rarely are.
- `ragged`: assignments sorted by expert and grouped matmuls (`jax.lax.ragged_dot`, model/grouped.py):
  dropless with no padding; a slow dense emulation on XLA:CPU (and reportedly on XLA:GPU).
- `tokamax`: the same on tokamax's grouped-matmul kernels (Mosaic on TPU, Mosaic-GPU / Triton on
  GPU; XLA elsewhere). Both skip frozen experts' weight gradients (model/grouped.py).
`auto` picks `tokamax` on GPU/TPU (`ragged` if tokamax is not installed) and `blocked` on CPU
(benchmarks/moe_layer.py compares them).

An expert id equal to E means "not on this shard" (used by expert parallelism, see moe.py): such an
assignment contributes nothing.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from esft_jax.model import quant
from esft_jax.model.grouped import grouped_mlp

ExpertWeights = dict[
    str, jax.Array
]  # gate, up [E, d, f]; down [E, f, d]; optional gate_bias, up_bias [E, f], down_bias [E, d]
BIASES = ("gate_bias", "up_bias", "down_bias")


class GLU(NamedTuple):
    """The experts' gated activation of a = x @ gate and c = x @ up (hashable: a static argument)."""

    kind: str = "swiglu"  # silu(a) * c; "clamped_swiglu" (gpt-oss): a <= limit, |c| <= limit,
    limit: float = 7.0  # a * sigmoid(alpha * a) * (c + 1)
    alpha: float = 1.702

    def __call__(self, a: jax.Array, c: jax.Array) -> jax.Array:
        if self.kind == "swiglu":
            return jax.nn.silu(a) * c
        a, c = jnp.minimum(a, self.limit), jnp.clip(c, -self.limit, self.limit)
        return a * jax.nn.sigmoid(self.alpha * a) * (c + 1)


SWIGLU = GLU()  # the default activation: silu(a) * c


def _biases(p: ExpertWeights) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    return tuple(p[k] for k in BIASES) if BIASES[0] in p else None


def resolve_strategy(strategy: str, platform: str | None = None, quantized: bool = False) -> str:
    """`strategy`, with "auto" made concrete for `platform` (default: JAX's default backend).
    A `quantized` stack (model/quant.py) is `blocked` on every backend: it dequantises one expert
    at a time, where a grouped matmul takes the whole stack (a layer of DeepSeek-V3's: 22 GB)."""
    if strategy != "auto":
        return strategy
    if quantized or (platform or jax.default_backend()) == "cpu":
        return "blocked"
    return "tokamax" if importlib.util.find_spec("tokamax") else "ragged"


def capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Buffer rows per expert: N when dropless, else ceil(cf * N * k / E), at most N."""
    if capacity_factor is None:
        return num_tokens
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * k / num_experts)))


def _batched_mlp(x_ecd, p: ExpertWeights, act: GLU, rows: str = "ecd"):
    """Every expert on its rows: x [E, C, d] (rows="ecd"), or the same rows x [C, d] ("cd") -> [E, C, d]."""
    a, c = (jnp.einsum(f"{rows},edf->ecf", x_ecd, p[k]) for k in ("gate", "up"))
    b = _biases(p)
    if b is not None:
        a, c = a + b[0][:, None], c + b[1][:, None]
    out = jnp.einsum("ecf,efd->ecd", act(a, c), p["down"])
    return out if b is None else out + b[2][:, None]


def _mixture(x_nd, weights_ne, p: ExpertWeights, act: GLU):
    """sum_e weights[n, e] * MLP_e(x_n): every expert on every token [N, d] float32."""
    out_end = _batched_mlp(x_nd, p, act, rows="cd")
    return jnp.einsum("end,ne->nd", out_end.astype(jnp.float32), weights_ne)


def _dense(x_nd, ids_nk, w_nk, p: ExpertWeights, act: GLU):
    e = p["gate"].shape[0]
    combine_ne = jnp.einsum("nke,nk->ne", jax.nn.one_hot(ids_nk, e, dtype=jnp.float32), w_nk)
    return _mixture(x_nd, combine_ne, p, act), jnp.zeros((), jnp.int32)


def sort_by_expert(ids_a: jax.Array, num_experts: int):
    """Stable sort of A assignments by expert id; returns order, per-expert counts [E+1], and each
    assignment's rank within its expert (in the original order)."""
    order = jnp.argsort(ids_a, stable=True)
    counts = jnp.bincount(ids_a, length=num_experts + 1)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(ids_a.shape[0]) - starts[ids_a[order]]
    rank = jnp.zeros_like(ids_a).at[order].set(rank_sorted)
    return order, counts, rank


def _capacity(x_nd, ids_nk, w_nk, p: ExpertWeights, act: GLU, capacity_factor: float | None):
    n, k = ids_nk.shape
    e = p["gate"].shape[0]
    c = capacity(n, k, e, capacity_factor)
    ids_a = ids_nk.reshape(-1)
    _, _, rank_a = sort_by_expert(ids_a, e)
    tok_a = jnp.arange(n * k) // k
    # Out-of-range rows (rank >= C, or id == E: not on this shard) are dropped by the scatter.
    buf_ecd = (
        jnp.zeros((e, c, x_nd.shape[1]), x_nd.dtype).at[ids_a, rank_a].set(x_nd[tok_a], mode="drop")
    )
    out_ecd = _batched_mlp(buf_ecd, p, act)
    y_ad = out_ecd.at[ids_a, rank_a].get(mode="fill", fill_value=0)
    y = jnp.einsum("nkd,nk->nd", y_ad.reshape(n, k, -1).astype(jnp.float32), w_nk)
    dropped = jnp.sum((rank_a >= c) & (ids_a < e)).astype(jnp.int32)
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
    # E past the last one
    expert_b = jnp.searchsorted(ends, jnp.arange(num_blocks) * block, side="right")
    return row_a, expert_b, num_blocks


Source = tuple  # one expert stack's (gate, up, down, biases or None) as the block loop takes them


def _source(p: ExpertWeights) -> Source:
    return p["gate"], p["up"], p["down"], _biases(p)


def _block_ranges(expert_b: jax.Array, sources: tuple[Source, ...]) -> list[tuple]:
    """Per source (experts first .. first + E_s - 1 of the combined ids), its blocks' range
    [start, end) and first id: sorted by expert, each source's blocks are contiguous, and unused
    blocks (id past the last source) come last."""
    ranges, first, start = [], 0, jnp.zeros((), jnp.int32)
    for source in sources:
        end = jnp.sum(expert_b < first + source[0].shape[0]).astype(jnp.int32)
        ranges.append((start, end, first))
        first, start = first + source[0].shape[0], end
    return ranges


def _mlp_blocks_fwd_loop(act, x_bcd, expert_b, sources, keep_pre: bool = False):
    """-> y [B, C, d], and with keep_pre the pre-activations a, c [B, C, f] (for the backward pass,
    which then needs no recomputation). One loop per source, over its blocks."""
    g0, _, dn0, _ = sources[0]
    out = {"y": jnp.zeros((*x_bcd.shape[:2], dn0.shape[2]), x_bcd.dtype)}
    if keep_pre:
        out["a"] = out["c"] = jnp.zeros((*x_bcd.shape[:2], g0.shape[2]), x_bcd.dtype)
    for (g, u, dn, b), (start, end, first) in zip(sources, _block_ranges(expert_b, sources)):

        def body(blk, out, g=g, u=u, dn=dn, b=b, first=first):
            i, x_cd = expert_b[blk] - first, x_bcd[blk]
            a, c = x_cd @ g[i], x_cd @ u[i]
            if b is not None:
                a, c = a + b[0][i], c + b[1][i]
            y = act(a, c) @ dn[i]
            out = {**out, "y": out["y"].at[blk].set(y if b is None else y + b[2][i])}
            if keep_pre:
                out = {**out, "a": out["a"].at[blk].set(a), "c": out["c"].at[blk].set(c)}
            return out

        out = jax.lax.fori_loop(start, end, body, out)
    return (out["y"], out["a"], out["c"]) if keep_pre else out["y"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mlp_blocks(act, x_bcd, expert_b, sources):
    """Block blk's rows through expert expert_b[blk]'s MLP, the experts numbered across `sources`
    (each a stack of E_s experts: ESFT's frozen stack, then its trained rows); blocks past the
    last expert are zero."""
    return _mlp_blocks_fwd_loop(act, x_bcd, expert_b, sources)


def _mlp_blocks_fwd(act, x_bcd, expert_b, sources):
    """symbolic_zeros: each argument comes with `.perturbed`; a frozen source (ESFT's stacked
    experts, a constant) gets no weight gradient, and frozen inputs no input gradient."""
    values = jax.tree.map(lambda a: a.value, (x_bcd, expert_b, sources))
    want_w = tuple(any(a.perturbed for a in jax.tree.leaves(s)) for s in sources)
    y, a, c = _mlp_blocks_fwd_loop(act, *values, keep_pre=True)
    return y, (*values, a, c, x_bcd.perturbed, want_w)


def _mlp_blocks_bwd(act, res, dy_bcd):
    x_bcd, expert_b, sources, a_bcf, c_bcf, want_x, want_w = res
    if isinstance(dy_bcd, SymbolicZero):
        dy_bcd = jnp.zeros((*x_bcd.shape[:2], sources[0][2].shape[2]), x_bcd.dtype)
    grads = {"x": jnp.zeros_like(x_bcd)} if want_x else {}
    for s, (source, wanted) in enumerate(zip(sources, want_w)):
        if wanted:
            grads[f"w{s}"] = jax.tree.map(jnp.zeros_like, source)
    for s, (start, end, first) in enumerate(_block_ranges(expert_b, sources)):
        g, u, dn, b = sources[s]

        def body(blk, grads, s=s, g=g, u=u, dn=dn, b=b, first=first):
            i, x_cd, dy_cd = expert_b[blk] - first, x_bcd[blk], dy_bcd[blk]
            h, act_vjp = jax.vjp(act, a_bcf[blk], c_bcf[blk])
            da, dc = act_vjp(dy_cd @ dn[i].T)
            out = dict(grads)
            if want_w[s]:
                gg, gu, gdn, gb = grads[f"w{s}"]
                gg, gu = gg.at[i].add(x_cd.T @ da), gu.at[i].add(x_cd.T @ dc)
                gdn = gdn.at[i].add(h.T @ dy_cd)
                if b is not None:
                    gb = tuple(w.at[i].add(d.sum(0)) for w, d in zip(gb, (da, dc, dy_cd)))
                out[f"w{s}"] = (gg, gu, gdn, gb)
            if want_x:
                out["x"] = grads["x"].at[blk].set(da @ g[i].T + dc @ u[i].T)
            return out

        grads = jax.lax.fori_loop(start, end, body, grads)
    return grads.get("x"), None, tuple(grads.get(f"w{s}") for s in range(len(sources)))


_mlp_blocks.defvjp(_mlp_blocks_fwd, _mlp_blocks_bwd, symbolic_zeros=True)


def _blocked(x_nd, ids_nk, w_nk, p: ExpertWeights, act: GLU, block: int, extra=None):
    """`extra`: more experts, numbered on from the stack's E (ESFT's trained rows): one layout and
    one loop per stack for all assignments, not a second pass."""
    n, k = ids_nk.shape
    sources = (_source(p),) + (() if extra is None else (_source(extra),))
    e = sum(source[0].shape[0] for source in sources)
    ids_a = ids_nk.reshape(-1)
    row_a, expert_b, num_blocks = _block_layout(ids_a, e, block)
    rows_rd = (
        jnp.zeros((num_blocks * block, x_nd.shape[1]), x_nd.dtype)
        .at[row_a]
        .set(x_nd[jnp.arange(n * k) // k], mode="drop")
    )
    out_rd = _mlp_blocks(act, rows_rd.reshape(num_blocks, block, -1), expert_b, sources)
    y_ad = out_rd.reshape(num_blocks * block, -1).at[row_a].get(mode="fill", fill_value=0)
    y = jnp.einsum("nkd,nk->nd", y_ad.reshape(n, k, -1).astype(jnp.float32), w_nk)
    return y, jnp.zeros((), jnp.int32)


SPILL_FACTOR = 1.25  # capacity factor of the `spill` strategy's batched pass, unless one is given
SPILL_MIN_ROWS = 128  # below this many rows per expert, batched matmuls lose to the block loop
SPILL_MAX_OVERFLOW = 0.125  # above this share of assignments overflowing, the block loop alone wins


def _spill(x_nd, ids_nk, w_nk, p: ExpertWeights, act: GLU, block: int, cf: float):
    n, k = ids_nk.shape
    e = p["gate"].shape[0]
    c = capacity(n, k, e, cf)
    if c < SPILL_MIN_ROWS:
        return _blocked(x_nd, ids_nk, w_nk, p, act, block)
    _, _, rank = sort_by_expert(ids_nk.reshape(-1), e)
    spilled = (rank.reshape(n, k) >= c) & (ids_nk < e)

    def blocked(x_nd, p, ids_nk=ids_nk):
        return _blocked(x_nd, ids_nk, w_nk, p, act, block)[0]

    def batched_then_spill(x_nd, p):
        y, _ = _capacity(x_nd, jnp.where(spilled, e, ids_nk), w_nk, p, act, cf)
        overflow = functools.partial(blocked, ids_nk=jnp.where(spilled, ids_nk, e))
        return y + jax.lax.cond(jnp.any(spilled), overflow, lambda *_: jnp.zeros_like(y), x_nd, p)

    balanced = jnp.sum(spilled) <= SPILL_MAX_OVERFLOW * n * k
    return jax.lax.cond(balanced, batched_then_spill, blocked, x_nd, p), jnp.zeros((), jnp.int32)


def _grouped(x_nd, ids_nk, w_nk, p: ExpertWeights, act: GLU, impl: str):
    n, k = ids_nk.shape
    e = p["gate"].shape[0]
    ids_a = ids_nk.reshape(-1)
    order, counts, _ = sort_by_expert(ids_a, e)
    x_ad = x_nd[
        order // k
    ]  # rows sorted by expert; assignments to id E come last, outside all groups
    expert_a = jnp.minimum(ids_a[order], e - 1)  # rows outside all groups get weight 0 below
    out_sorted = grouped_mlp(
        impl,
        act,
        x_ad,
        counts[:e].astype(jnp.int32),
        expert_a,
        p["gate"],
        p["up"],
        p["down"],
        _biases(p),
    )
    out_ad = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
    w_nk = jnp.where(ids_nk < e, w_nk, 0.0)
    y = jnp.einsum("nkd,nk->nd", out_ad.reshape(n, k, -1).astype(jnp.float32), w_nk)
    return y, jnp.zeros((), jnp.int32)


def _in_dtype(p: ExpertWeights, scheme: quant.Scheme | None, dtype, one_at_a_time: bool):
    """The experts in the compute dtype; quantised matrices as QuantStacks the blocked loop
    dequantises one expert at a time (one_at_a_time), else dequantised whole."""
    if scheme is not None:
        p = (quant.stacks if one_at_a_time else quant.dequantize_experts)(p, scheme, dtype)
    return {
        name: w if isinstance(w, quant.QuantStack) else jnp.asarray(w, dtype)
        for name, w in p.items()
    }


def mixture(x_nd: jax.Array, weights_ne: jax.Array, p: ExpertWeights, act: GLU = SWIGLU):
    """x [N, d], weights [N, E] -> sum_e weights[n, e] * MLP_e(x_n) [N, d] float32: every expert
    (unquantised) on every token, O(E) work (the `dense` strategy's; the dense pass of
    model/router_grad.py)."""
    return _mixture(
        x_nd, weights_ne.astype(jnp.float32), _in_dtype(p, None, x_nd.dtype, False), act
    )


def routed_experts(
    x_nd: jax.Array,
    ids_nk: jax.Array,
    weights_nk: jax.Array,
    p: ExpertWeights,
    strategy: str = "auto",
    capacity_factor: float | None = None,
    block: int = BLOCK,
    act: GLU = SWIGLU,
    extra: ExpertWeights | None = None,
    scheme: quant.Scheme | None = None,
) -> tuple[jax.Array, jax.Array]:
    """x [N, d], ids/weights [N, k] -> (y [N, d] float32, dropped assignments: int32 scalar).

    extra (`blocked` only): S more experts, ids E .. E + S - 1 (ESFT's trained rows beside the
    frozen stack), in the same pass; E + S then means "not here". scheme: `p`'s matrices are
    quantised so, with their scales (model/quant.py): the blocked loop dequantises one expert at a
    time, the other paths the stack ("auto": blocked)."""
    strategy = resolve_strategy(strategy, quantized=scheme is not None)
    p = _in_dtype(p, scheme, x_nd.dtype, one_at_a_time=strategy == "blocked")
    weights_nk = weights_nk.astype(jnp.float32)
    if strategy == "dense":
        return _dense(x_nd, ids_nk, weights_nk, p, act)
    if strategy == "capacity":
        return _capacity(x_nd, ids_nk, weights_nk, p, act, capacity_factor)
    if extra is not None:
        if strategy != "blocked":
            raise ValueError(f"extra experts are for the blocked strategy, not {strategy!r}")
        extra = {name: jnp.asarray(w, x_nd.dtype) for name, w in extra.items()}
        return _blocked(x_nd, ids_nk, weights_nk, p, act, block, extra)
    if strategy == "blocked":
        return _blocked(x_nd, ids_nk, weights_nk, p, act, block)
    if strategy == "spill":
        return _spill(x_nd, ids_nk, weights_nk, p, act, block, capacity_factor or SPILL_FACTOR)
    if strategy in ("ragged", "tokamax"):
        return _grouped(
            x_nd, ids_nk, weights_nk, p, act, "lax" if strategy == "ragged" else "tokamax"
        )
    raise ValueError(f"unknown MoE strategy {strategy!r}")

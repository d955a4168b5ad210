"""The experts' MLP over assignment rows sorted by expert, as grouped matmuls (the `ragged` and
`tokamax` strategies of model/experts.py).

Rows [A, d] come sorted by expert; `group_sizes` [E] says how many belong to each expert (rows
past their sum belong to none and give zeros). Two grouped-matmul implementations:
- "lax": `jax.lax.ragged_dot` / `ragged_dot_general` (a dense emulation on XLA:CPU, and reported to
  be one on XLA:GPU too);
- "tokamax": tokamax's kernels (Pallas Mosaic on TPU, Mosaic-GPU / Triton on GPU), which pick their
  implementation from the backend at trace time and fall back to XLA elsewhere.
The custom VJP computes the weight gradients (grouped x^T dy: a ragged contraction) only for
weights being differentiated: ESFT's frozen stacked experts cost the backward pass only dx.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.lax import RaggedDotDimensionNumbers

Biases = tuple[jax.Array, jax.Array, jax.Array] | None  # gate [E, f], up [E, f], down [E, d]
# sum over the rows of each group: x [A, d], dy [A, f] -> [E, d, f]
_PER_GROUP_OUTER = RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def _tokamax():
    """tokamax, with absl's flags marked parsed first: its config reads absl flags, which would
    otherwise parse sys.argv (an esft or pytest command line) and fail."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    import tokamax

    return tokamax


def _gmm(impl: str, lhs_ad: jax.Array, w_edf: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Row a of lhs times its group's weight: [A, d] x [E, d, f] -> [A, f]."""
    if impl == "tokamax":
        return _tokamax().ragged_dot(lhs_ad, w_edf, group_sizes)
    return jax.lax.ragged_dot(lhs_ad, w_edf, group_sizes)


def _tgmm(impl: str, x_ad: jax.Array, dy_af: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Per group, x^T dy over its rows: [A, d], [A, f] -> [E, d, f] (a weight gradient)."""
    if impl == "tokamax":
        return _tokamax().ragged_dot_general(x_ad, dy_af, group_sizes, _PER_GROUP_OUTER)
    return jax.lax.ragged_dot_general(x_ad, dy_af, group_sizes, _PER_GROUP_OUTER)


def _forward(impl, act, x_ad, group_sizes, expert_a, g, u, dn, b: Biases):
    a, c = _gmm(impl, x_ad, g, group_sizes), _gmm(impl, x_ad, u, group_sizes)
    if b is not None:
        a, c = a + b[0][expert_a], c + b[1][expert_a]
    y = _gmm(impl, act(a, c), dn, group_sizes)
    return (y if b is None else y + b[2][expert_a]), a, c


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def grouped_mlp(
    impl: str,
    act: Callable,
    x_ad: jax.Array,
    group_sizes: jax.Array,
    expert_a: jax.Array,
    g: jax.Array,
    u: jax.Array,
    dn: jax.Array,
    b: Biases,
) -> jax.Array:
    """down(act(x @ gate + b_gate, x @ up + b_up)) + b_down per row, with row a's expert's weights.
    expert_a [A]: each row's expert (clamped into [0, E): the biases are gathered with it)."""
    return _forward(impl, act, x_ad, group_sizes, expert_a, g, u, dn, b)[0]


def _grouped_mlp_fwd(impl, act, x_ad, group_sizes, expert_a, g, u, dn, b):
    values = [v.value for v in (x_ad, group_sizes, expert_a, g, u, dn)]
    b_values = None if b is None else tuple(v.value for v in b)
    want_x = x_ad.perturbed
    want_w = any(v.perturbed for v in (g, u, dn, *(b or ())))
    y, a, c = _forward(impl, act, *values, b_values)
    return y, (*values, b_values, a, c, want_x, want_w)


def _grouped_mlp_bwd(impl, act, res, dy_ad):
    x_ad, group_sizes, expert_a, g, u, dn, b, a, c, want_x, want_w = res
    if isinstance(dy_ad, SymbolicZero):
        dy_ad = jnp.zeros((x_ad.shape[0], dn.shape[2]), x_ad.dtype)
    h, act_vjp = jax.vjp(act, a, c)
    da, dc = act_vjp(_gmm(impl, dy_ad, jnp.swapaxes(dn, 1, 2), group_sizes))
    dx = None
    if want_x:
        dx = _gmm(impl, da, jnp.swapaxes(g, 1, 2), group_sizes) + _gmm(
            impl, dc, jnp.swapaxes(u, 1, 2), group_sizes
        )
    dg = du = ddn = db = None
    if want_w:
        dg, du = _tgmm(impl, x_ad, da, group_sizes), _tgmm(impl, x_ad, dc, group_sizes)
        ddn = _tgmm(impl, h, dy_ad, group_sizes)
        if b is not None:
            # rows past the groups carry zero gradient (their combine weight is 0),
            # so clamped ids are harmless
            db = tuple(
                jax.ops.segment_sum(d, expert_a, num_segments=g.shape[0]) for d in (da, dc, dy_ad)
            )
    elif b is not None:
        db = (None,) * 3
    return dx, None, None, dg, du, ddn, db


grouped_mlp.defvjp(_grouped_mlp_fwd, _grouped_mlp_bwd, symbolic_zeros=True)

"""The MoE strategies against each other and a float64 NumPy loop: outputs, gradients, drops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_float32_close, roundings

from esft_jax.model import experts
from esft_jax.model.experts import capacity, routed_experts

N, D, F, E, K = 24, 16, 8, 16, 4
# float32 roundings of one SwiGLU expert (3 matmuls of width <= D), K of them summed; twice that backward
FORWARD, BACKWARD = roundings(3, D * K), roundings(6, D * K)


@pytest.fixture(autouse=True)
def spill_at_any_size(monkeypatch):
    """`spill` takes its batched pass only from 128 rows per expert; these problems are smaller."""
    monkeypatch.setattr(experts, "SPILL_MIN_ROWS", 1)


def _problem(seed=0, used_experts=8):
    """Tokens routed only to experts < used_experts, so the rest receive nothing."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    ids = np.stack([rng.choice(used_experts, K, replace=False) for _ in range(N)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (N, K)).astype(np.float32)
    p = {
        "gate": rng.normal(size=(E, D, F)) / 4,
        "up": rng.normal(size=(E, D, F)) / 4,
        "down": rng.normal(size=(E, F, D)) / 4,
    }
    return x, ids, w, {k: v.astype(np.float32) for k, v in p.items()}


def _numpy_reference(x, ids, w, p, keep=None):
    x, w = x.astype(np.float64), w.astype(np.float64)
    y = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            if keep is not None and not keep[n, j]:
                continue
            e = ids[n, j]
            g, u = x[n] @ p["gate"][e], x[n] @ p["up"][e]
            y[n] += w[n, j] * ((g / (1 + np.exp(-g)) * u) @ p["down"][e])
    return y


ALL = ["dense", "capacity", "blocked", "spill", "ragged", "tokamax"]


@pytest.mark.parametrize("strategy", ALL)
def test_strategy_matches_numpy(strategy):
    x, ids, w, p = _problem()
    y, dropped = routed_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), p, strategy)
    assert_float32_close(y, _numpy_reference(x, ids, w, p), FORWARD)
    assert int(dropped) == 0


@pytest.mark.parametrize("strategy", ALL[1:])
def test_gradients_match_dense(strategy):
    x, ids, w, p = _problem(seed=1)
    r = np.random.default_rng(2).normal(size=(N, D)).astype(np.float32)

    def loss(x, w, p, strategy):
        y, _ = routed_experts(x, jnp.asarray(ids), w, p, strategy)
        return jnp.sum(y * r)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    ref = grad(jnp.asarray(x), jnp.asarray(w), p, "dense")
    got = grad(jnp.asarray(x), jnp.asarray(w), p, strategy)
    jax.tree.map(lambda a, b: assert_float32_close(a, b, BACKWARD), got, ref)
    unused = np.arange(E) >= 8
    for name in ("gate", "up", "down"):
        assert np.all(np.asarray(got[2][name])[unused] == 0), (
            "experts with no tokens get zero gradient"
        )
        assert np.any(np.asarray(got[2][name])[~unused] != 0)


@pytest.mark.parametrize("strategy", ALL)
def test_sentinel_id_contributes_nothing(strategy):
    """Id E marks an assignment to an expert on another shard (expert parallelism)."""
    x, ids, w, p = _problem(seed=3)
    ids_masked = ids.copy()
    ids_masked[::3, 1] = E
    keep = ids_masked < E
    y, _ = routed_experts(jnp.asarray(x), jnp.asarray(ids_masked), jnp.asarray(w), p, strategy)
    assert_float32_close(y, _numpy_reference(x, ids, w, p, keep), FORWARD)


@pytest.mark.parametrize(
    "strategy,cf",
    [
        ("blocked", None),
        ("spill", 0.1),
        ("spill", 1.8),
        ("spill", 100.0),
        ("ragged", None),
        ("tokamax", None),
    ],
)
def test_gradient_for_one_argument_matches_dense(strategy, cf):
    """Differentiating only the input (frozen experts, as in ESFT) or only the experts takes other
    branches of the custom VJP (symbolic zeros); spill factors: all spilled, some, none."""
    x, ids, w, p = _problem(seed=5)
    r = np.random.default_rng(6).normal(size=(N, D)).astype(np.float32)

    def loss(x, p, strategy):
        return jnp.sum(routed_experts(x, jnp.asarray(ids), jnp.asarray(w), p, strategy, cf)[0] * r)

    for argnum in (0, 1):
        grad = jax.jit(jax.grad(loss, argnums=argnum), static_argnums=2)
        jax.tree.map(
            lambda a, b: assert_float32_close(a, b, BACKWARD),
            grad(jnp.asarray(x), p, strategy),
            grad(jnp.asarray(x), p, "dense"),
        )


@pytest.mark.parametrize("strategy", ["ragged", "tokamax"])
def test_grouped_matmuls_skip_frozen_experts_weight_gradients(strategy):
    """ESFT differentiates only the input of the frozen stacked experts: the backward pass then has no
    per-group x^T dy contraction (the weight gradients), only the grouped matmuls of dx."""
    x, ids, w, p = _problem(seed=7)

    def loss(x, p):
        return jnp.sum(routed_experts(x, jnp.asarray(ids), jnp.asarray(w), p, strategy)[0])

    def weight_gradients(argnums) -> int:
        text = str(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(jnp.asarray(x), p))
        # ragged contraction
        return text.count("lhs_ragged_dimensions=(0,), rhs_group_dimensions=())")

    # gate, up, down (tokamax nests its jaxprs)
    assert weight_gradients(0) == 0 and weight_gradients(1) >= 3


@pytest.mark.parametrize("block", [1, 3, 8, 128])
def test_blocked_any_block_size_matches_numpy_and_dense_gradients(block):
    """Experts spanning many blocks, partial blocks, one block for all: the same outputs and gradients."""
    x, ids, w, p = _problem(seed=4, used_experts=6)
    ids[::4, 0] = E  # some assignments elsewhere
    keep = ids < E
    y, _ = routed_experts(
        jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), p, "blocked", block=block
    )
    assert_float32_close(y, _numpy_reference(x, np.minimum(ids, E - 1), w, p, keep), FORWARD)

    def loss(p, x, strategy):
        return jnp.sum(
            routed_experts(x, jnp.asarray(ids), jnp.asarray(w), p, strategy, block=block)[0] ** 2
        )

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    jax.tree.map(
        lambda a, b: assert_float32_close(a, b, BACKWARD),
        grad(p, jnp.asarray(x), "blocked"),
        grad(p, jnp.asarray(x), "dense"),
    )


@pytest.mark.parametrize("block", [1, 8])
def test_blocked_extra_experts_are_the_stack_they_extend(block):
    """ESFT's one pass: S extra experts (its trained rows) numbered E .. E + S - 1 beside a frozen
    stack give the outputs and gradients of one stack of E + S experts (float64 NumPy forward,
    `dense` on the concatenated stack backward); the frozen stack gets no gradient at all."""
    x, ids, w, p = _problem(seed=5, used_experts=E)
    s = 3
    rng = np.random.default_rng(9)
    extra = {k: (rng.normal(size=(s, *v.shape[1:])) / 4).astype(np.float32) for k, v in p.items()}
    ids[::3, 1] = E + rng.integers(0, s, len(ids[::3]))  # some assignments to the extra experts
    ids[::5, 2] = E + s  # some elsewhere
    keep = ids < E + s
    both = {k: np.concatenate([p[k], extra[k]]) for k in p}
    y, _ = routed_experts(
        jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), p, "blocked", block=block, extra=extra
    )
    assert_float32_close(y, _numpy_reference(x, np.minimum(ids, E + s - 1), w, both, keep), FORWARD)

    def loss(extra, x):
        y, _ = routed_experts(
            x, jnp.asarray(ids), jnp.asarray(w), p, "blocked", block=block, extra=extra
        )
        return jnp.sum(y**2)

    def reference(extra, x):
        stack = {k: jnp.concatenate([p[k], extra[k]]) for k in p}
        y, _ = routed_experts(x, jnp.asarray(ids), jnp.asarray(w), stack, "dense")
        return jnp.sum(y**2)

    args = ({k: jnp.asarray(v) for k, v in extra.items()}, jnp.asarray(x))
    jax.tree.map(
        lambda a, b: assert_float32_close(a, b, BACKWARD),
        jax.grad(loss, argnums=(0, 1))(*args),
        jax.grad(reference, argnums=(0, 1))(*args),
    )


def test_capacity_factor_drops_overflow_in_token_order_and_counts_it():
    x, ids, w, p = _problem(seed=4, used_experts=6)  # 24 tokens x 4 onto 6 experts: heavy overflow
    cf = 1.0
    c = capacity(N, K, E, cf)
    seen = np.zeros(E, int)
    keep = np.zeros(ids.shape, bool)
    for n in range(N):  # the first C assignments of each expert, in token order, are kept
        for j in range(K):
            keep[n, j] = seen[ids[n, j]] < c
            seen[ids[n, j]] += 1
    y, dropped = routed_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), p, "capacity", cf)
    assert int(dropped) == int((~keep).sum()) > 0
    assert_float32_close(y, _numpy_reference(x, ids, w, p, keep), FORWARD)


def test_capacity_bounds():
    assert capacity(100, 6, 64, None) == 100  # dropless: one expert may take every token
    assert capacity(100, 6, 64, 1.25) == 12
    assert capacity(4, 6, 4, 2.0) == 4  # never more than N

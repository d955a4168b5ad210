"""Float32 comparison bounds that hold on any CPU.

Two float32 computations of the same value (a scan against a loop, 8 devices against 1, a cache
against a full forward, float32 against a float64 reference) differ by rounding alone, and how
much depends on the CPU's kernels (vector width, FMA, summation order). So a bound is set from
what is compared, never from what one machine happened to give: a number of float32 roundings
(`eps` = 2^-23 each) at the scale of the compared tensor (its largest magnitude).
"""

from __future__ import annotations

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def roundings(depth: int, width: int, slack: float = 8.0) -> float:
    """The roundings that separate two orderings of a network's arithmetic: each of `depth` layers
    re-rounds sums of `width` terms, whose rounding error grows like sqrt(width) (a random walk);
    `slack` covers the constant factors of softmax, norms and residual adds."""
    return slack * depth * math.sqrt(width)


def model_roundings(cfg) -> float:
    """roundings() for a ModelConfig's forward pass: its depth and widest sum."""
    return roundings(cfg.num_hidden_layers, max(cfg.hidden_size, cfg.intermediate_size))


def bound(want, n_roundings: float) -> float:
    """The absolute bound of `n_roundings` float32 roundings at the scale of `want`."""
    scale = float(np.max(np.abs(np.asarray(want, np.float64)), initial=0.0))
    return n_roundings * EPS32 * max(scale, float(np.finfo(np.float32).tiny))


def assert_float32_close(got, want, n_roundings: float, err_msg: str = "") -> None:
    """|got - want| <= bound(want, n_roundings) elementwise."""
    np.testing.assert_allclose(
        np.asarray(got, np.float64),
        np.asarray(want, np.float64),
        rtol=0,
        atol=bound(want, n_roundings),
        err_msg=err_msg,
    )


def assert_adam_close(
    got, want, n_roundings: float, lr: float, steps: int, max_fraction: float = 0.01
) -> None:
    """Parameters after `steps` Adam steps computed two ways. Adam divides each gradient by its own
    running magnitude, so where a gradient element is itself at rounding level, rounding alone can
    change that element's update by up to lr a step. So: every element within bound(want,
    n_roundings), except at most `max_fraction` of them, which stay within 2 * lr * steps."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = np.abs(got - want)
    off = diff > bound(want, n_roundings)
    assert off.mean() <= max_fraction, f"{off.sum()} of {off.size} elements beyond float32 rounding"
    assert np.all(diff <= 2 * lr * steps), f"max difference {diff.max():.3g} > 2 * lr * steps"

"""Timing helpers shared by the benchmarks: compile once, then the median of a few runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def seconds(fn: Callable, *args, reps: int = 5) -> float:
    """Median wall time of fn(*args) (already jitted or cheap to trace), after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(calls: dict[str, Callable[[], object]], reps: int = 5) -> dict[str, float]:
    """Median wall time of each call, the calls taking turns rep by rep: on a shared machine whose
    speed drifts, every call sees the same drift, so their ratios hold."""
    for call in calls.values():
        jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}

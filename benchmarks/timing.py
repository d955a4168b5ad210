"""Timing helpers shared by the benchmarks: compile once, then the median of a few runs."""

from __future__ import annotations

import statistics
import time
from typing import Callable

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

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


def train_state(method, params, tx) -> dict:
    """A train step's state {step, trainable, opt_state} for `method` (train/method.py) on `params`."""
    import jax.numpy as jnp

    trainable = method.init(params)
    return {
        "step": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "opt_state": tx.init(trainable),
    }


def carrying(step: Callable, state: dict, *args) -> Callable[[], object]:
    """A call of step(state, *args) -> (state, metrics) that carries the state from call to call
    (the step donates it); returns the loss."""
    holder = {"state": state}

    def call():
        holder["state"], metrics = step(holder["state"], *args)
        return metrics["loss"]

    return call


def compared(seconds: dict[str, float], name: str, a: str, b: str) -> list[str]:
    """A table row: `name`, the seconds of "name a" and "name b", and b's over a's."""
    first, second = seconds[f"{name} {a}"], seconds[f"{name} {b}"]
    return [name, f"{first:.3f}", f"{second:.3f}", f"{second / first:.2f}"]


def machine() -> str:
    """The CPU model and its float32 matmul rate (2048^3, median of 3): benchmark numbers from
    different machines (or loads) compare only through it."""
    import subprocess

    import jax.numpy as jnp

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True)
    a = jnp.ones((2048, 2048), jnp.float32)
    rate = 2 * 2048**3 / seconds(jax.jit(jnp.matmul), a, a, reps=3) / 1e9
    name = " ".join(cpu.stdout.partition(":")[2].split()) or jax.devices()[0].device_kind
    return f"{name}; fp32 2048^3 matmul {rate:.0f} GFLOP/s"

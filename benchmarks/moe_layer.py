"""Benchmark 1: the routed-expert layer, forward + backward, per MoE strategy.

    .venv/bin/python benchmarks/moe_layer.py                 # E in 16, 64, 256 (top-6, width 128)
    .venv/bin/python benchmarks/moe_layer.py --tokens 4096 --hidden 2048 --width 1408 \
        --dtype bfloat16                                     # V2-Lite

Routing: uniform random top-k (balanced loads), and, when the ESFT reference data is present
($ESFT_REFERENCE, default ../shared/esft-reference), DeepSeek-V2-Lite's real routing of the intent
task (E = 64, top-6; loads as skewed as a trained router makes them), layer --real-layer.
The score is achieved FLOP/s, counting only the active experts' FLOPs (top-k per token), over the FLOP/s
of the same machine running the same FLOPs as one dense SwiGLU on N*k rows: 1.0 means "as fast as if
routing were free". All numbers come from one run, so the ratios hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from timing import interleaved_seconds

from esft_jax.model.experts import SPILL_FACTOR, capacity, resolve_strategy, routed_experts
from esft_jax.report import markdown_table as table
from esft_jax.routing.official_logs import read_layer_log

REFERENCE = Path(
    os.environ.get(
        "ESFT_REFERENCE", Path(__file__).resolve().parents[1] / "../shared/esft-reference"
    )
)


def _real_routing(n: int, k: int, layer: int):
    """The first n tokens' (weights, ids) of V2-Lite on the intent task, or None without the data."""
    path = REFERENCE / "results" / "expert_scores" / "intent" / f"expert_weights_{layer}.txt"
    if not path.is_file() or k != 6:
        return None
    seqs = read_layer_log(path)
    ids, w = (jnp.concatenate([jnp.asarray(s[i]) for s in seqs])[:n] for i in (0, 1))
    return (w.astype(jnp.float32), ids.astype(jnp.int32)) if ids.shape[0] == n else None


def _problem(n: int, d: int, f: int, e: int, k: int, dtype, routing=None):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (n, d), dtype)
    w, ids = routing or jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[1], (n, e))), k)
    p = {
        "gate": jax.random.normal(keys[2], (e, d, f), dtype) * d**-0.5,
        "up": jax.random.normal(keys[3], (e, d, f), dtype) * d**-0.5,
        "down": jax.random.normal(keys[4], (e, f, d), dtype) * f**-0.5,
    }
    return x, ids, w, p


def _step(strategy: str, cf: float | None, ids, w):
    def loss(p, x):
        y, dropped = routed_experts(x, ids, w, p, strategy, cf)
        return jnp.sum(y.astype(jnp.float32) ** 2), dropped

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _dense_reference(x_ad, p):
    """One dense SwiGLU with expert 0's weights on all N*k rows: the same FLOPs as the active experts."""

    def loss(p, x):
        h = jax.nn.silu(x @ p["gate"][0]) * (x @ p["up"][0])
        return jnp.sum((h @ p["down"][0]).astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (p, x_ad)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--width", type=int, default=128, help="expert width f")
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--experts", default="16,64,256")
    ap.add_argument("--strategies", default="dense,capacity,capacity:1.25,blocked,spill,ragged")
    ap.add_argument(
        "--real-layer", type=int, default=10, help="V2-Lite layer of the real-routing case"
    )
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n, d, f, k, dtype = args.tokens, args.hidden, args.width, args.topk, jnp.dtype(args.dtype)
    flops = 3 * 2 * n * k * d * f * 3  # three matmuls, backward = 2x forward
    print(
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), N={n} tokens, d={d}, f={f}, top-{k}, "
        f"{args.dtype}; default strategy here: {resolve_strategy('auto')}"
    )
    cases = [(int(e), "uniform", None) for e in args.experts.split(",")]
    real = _real_routing(n, k, args.real_layer)
    if real is not None:
        cases.append((64, f"V2-Lite intent L{args.real_layer}", real))
    rows = []
    for e, routing_name, routing in cases:
        x, ids, w, p = _problem(n, d, f, e, k, dtype, routing)
        skew = f"{int(jnp.bincount(ids.reshape(-1), length=e).max()) / (n * k / e):.2f}"
        ref_fn, ref_args = _dense_reference(jnp.repeat(x, k, axis=0), p)
        steps = {}
        for spec in args.strategies.split(","):
            strategy, _, cf = spec.partition(":")
            if strategy == "ragged" and jax.default_backend() == "cpu" and e > 16:
                continue  # a dense masked emulation on XLA:CPU: minutes per step at this size
            steps[spec] = _step(strategy, float(cf) if cf else None, ids, w)
        calls = {spec: functools.partial(step, p, x) for spec, step in steps.items()}
        secs = interleaved_seconds(
            {"dense reference": functools.partial(ref_fn, *ref_args), **calls}, reps=args.reps
        )
        ref_s = secs["dense reference"]
        for spec, step in steps.items():
            strategy, _, cf = spec.partition(":")
            s = secs[spec]
            (_, dropped), _ = step(p, x)
            factor = float(cf) if cf else (SPILL_FACTOR if strategy == "spill" else None)
            buffer = f"C={capacity(n, k, e, factor)}" if strategy in ("capacity", "spill") else ""
            rows.append(
                [
                    str(e),
                    routing_name,
                    skew,
                    spec,
                    buffer,
                    f"{s * 1e3:.1f}",
                    f"{flops / s / 1e9:.1f}",
                    f"{flops / ref_s / 1e9:.1f}",
                    f"{ref_s / s:.3f}",
                    f"{int(dropped) / (n * k):.1%}",
                ]
            )
    print(
        table(
            [
                "E",
                "routing",
                "max load / mean",
                "strategy",
                "buffer",
                "fwd+bwd ms",
                "active GFLOP/s",
                "dense GFLOP/s",
                "ratio",
                "dropped",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()

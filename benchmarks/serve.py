"""Serving many ESFT adapters from one base model: the adapter bank with continuous batching
(serve/engine.py) against one merged model per adapter, swapped in batch by batch.

    .venv/bin/python benchmarks/serve.py                      # N = 1, 4, 16 adapters, 64 requests
    .venv/bin/python benchmarks/serve.py --adapters 4 --requests 32 --rows 8

The built-in pretrained tiny MoE (esft_jax/builtin/tiny_moe) gets N synthetic ESFT adapters, each
the rows of `--per-layer` random routed experts per MoE layer (3 of 32: about what ESFT-Token p=0.2
selects on the built-in tasks), base + noise, written in ESFT's adapter format. The workload:
`--requests` prompts of BOS + random token ids (uniform lengths 20-120), greedy, `--max-tokens`
each, every request's adapter drawn uniformly from the N.

- **mixed**: one Engine with all N adapters in its bank, every request submitted at once
  (continuous batching over `--rows` rows);
- **swap**: requests grouped by adapter and served in batches of `--rows` with eval.generate
  (one compiled decode loop per batch), the adapter's merged params (checkpoint.adapter
  apply_adapter on the host copy of the base, placed on the device) built when its group starts:
  one merged copy resident at a time; the time to build and place it is counted and shown.

Prompts are padded to one 128-token bucket in both methods (one prefill width to compile). Each
configuration runs the workload once to compile every shape (the same workload: the same shapes),
then `--reps` times, the two methods taking turns; the median run is reported. "params held" is
counted, not measured: mixed holds the base + the bank's rows; swap the host copy of the base +
one merged copy (on a CPU both in host memory); all N merged copies are shown beside. One process
runs everything (its peak RSS is printed once). The greedy tokens of mixed and swap are asserted
equal on the first `--check` requests and compared on all.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "esft_jax" / "builtin" / "tiny_moe"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
BUCKET = 128  # prompts are padded to 128 tokens (both methods): one prefill width to compile


def _adapters(cfg, out: Path, n: int, per_layer: int, seed: int) -> dict[str, Path]:
    """N adapters in ESFT's format: per MoE layer `per_layer` random experts, each projection the
    base's + 0.5 x its std of Gaussian noise (enough to change greedy outputs)."""
    from safetensors.numpy import load_file

    from esft_jax.checkpoint.adapter import write_adapter

    base = load_file(MODEL / "model.safetensors")
    rng = np.random.default_rng(seed)
    adapters = {}
    for a in range(n):
        tensors = {}
        for layer in cfg.moe_layer_ids:
            for e in sorted(rng.choice(cfg.n_routed_experts, per_layer, replace=False)):
                for proj in PROJECTIONS:
                    name = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                    w = base[name]
                    noise = 0.5 * w.std() * rng.standard_normal(w.shape)
                    tensors[name] = (w + noise).astype(w.dtype)
        meta = {"method": "esft", "model_type": cfg.model_type}
        adapters[f"a{a}"] = write_adapter(out / f"a{a}", tensors, meta)
    return adapters


def _workload(cfg, names: Sequence[str], n: int, max_tokens: int, seed: int):
    """n greedy requests: BOS + 20-120 random ids (no special tokens), a uniform adapter each."""
    from esft_jax.serve.engine import Request

    rng = np.random.default_rng(seed)
    head = [cfg.bos_token_id] if cfg.bos_token_id is not None else []
    requests = []
    for _ in range(n):
        ids = rng.integers(3, cfg.vocab_size, int(rng.integers(20, 121))).tolist()
        requests.append(Request(head + ids, str(rng.choice(names)), max_tokens=max_tokens))
    return requests


def _nbytes(tree) -> int:
    import jax

    return sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(tree))


def _mixed(engine, requests) -> tuple[list[list[int]], int]:
    """(continuations, engine steps): every request submitted, stepped until all have finished
    (what Engine.run does, counting the steps)."""
    ids = [engine.submit(r) for r in requests]
    done, steps = {}, 0
    while engine.busy:
        done.update((e.id, e.finished.tokens) for e in engine.step() if e.finished is not None)
        steps += 1
    return [done[i] for i in ids], steps


def _swap(cfg, base_np, updates, requests, batch: int):
    """(continuations, batches, seconds building and placing merged params): per adapter, its
    merged params built from the host base, then its requests in batches of `batch`, padded with
    empty rows to a power of two (as the engine pads its prefill groups: few compilations)."""
    import jax

    from esft_jax.checkpoint.adapter import apply_adapter
    from esft_jax.eval.generate import generate

    out: list[list[int]] = [[] for _ in requests]
    swap, batches = 0.0, 0
    for name, (tensors, meta) in updates.items():
        group = [i for i, r in enumerate(requests) if r.model == name]
        if not group:
            continue
        began = time.perf_counter()
        merged = jax.block_until_ready(
            jax.device_put(apply_adapter(base_np, cfg, tensors, meta, name))
        )
        swap += time.perf_counter() - began
        for lo in range(0, len(group), batch):
            rows = group[lo : lo + batch]
            empty = [[]] * (_power_of_two(len(rows)) - len(rows))  # done from the start
            got = generate(
                merged,
                cfg,
                [requests[i].prompt for i in rows] + empty,
                max_new_tokens=max(requests[i].max_tokens for i in rows),
                eos_id=cfg.eos_token_id if cfg.eos_token_id is not None else -1,
                bucket=BUCKET,
            )
            batches += 1
            for i, tokens in zip(rows, got):
                out[i] = tokens[: requests[i].max_tokens]
        del merged  # one merged copy resident at a time
    return out, batches, swap


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _timed(fn: Callable[[], tuple], reps: int) -> list[tuple[float, tuple]]:
    """[(seconds, fn's result)] of `reps` calls."""
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        out.append((time.perf_counter() - start, result))
    return out


def _rows(cfg, params_np, params, n: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Both methods for N = n adapters, per serving row count: their table rows, as dicts. Each is run once to
    compile (the same workload: the same shapes), then --reps times, the two methods taking turns;
    the median run is reported."""
    from esft_jax.checkpoint.adapter import read_adapter
    from esft_jax.serve.engine import Engine

    adapters = _adapters(cfg, tmp / f"n{n}", n, args.per_layer, args.seed)
    requests = _workload(cfg, list(adapters), args.requests, args.max_tokens, args.seed)
    updates = {name: read_adapter(d) for name, d in adapters.items()}
    max_len = BUCKET + args.max_tokens  # the prompts' bucket + the output
    model_bytes, rows = _nbytes(params_np), []
    for n_rows in args.rows:
        began = time.perf_counter()
        engine = Engine(cfg, params, adapters, rows=n_rows, max_len=max_len, bucket=BUCKET)
        built = time.perf_counter() - began  # the bank
        methods = {
            "mixed": functools.partial(_mixed, engine, requests),
            "swap": functools.partial(_swap, cfg, params_np, updates, requests, n_rows),
        }
        warm = {name: _timed(fn, 1)[0][0] for name, fn in methods.items()}  # compiles
        warm["mixed"] += built
        runs = {name: [] for name in methods}
        for _ in range(args.reps):
            for name, fn in methods.items():
                runs[name] += _timed(fn, 1)
        median = {name: sorted(r, key=lambda x: x[0])[len(r) // 2] for name, r in runs.items()}
        (mixed_s, (mixed, steps)), (swap_s, (swap, batches, swap_load)) = median.values()
        same = [a == b for a, b in zip(mixed, swap)]
        assert all(same[: args.check]), f"N={n} rows={n_rows}: mixed != swap on a checked request"
        common = {"n": n, "rows": n_rows, "requests": len(requests), "same": sum(same)}
        bank_bytes = _nbytes(engine.bank.override)
        rows.append(
            {**common, "method": "mixed", "tokens": sum(map(len, mixed)), "s": mixed_s}
            | {"warm": warm["mixed"], "calls": f"{steps} steps", "swap_s": None}
            | {"held": model_bytes + bank_bytes}
        )
        rows.append(
            {**common, "method": "swap", "tokens": sum(map(len, swap)), "s": swap_s}
            | {"warm": warm["swap"], "calls": f"{batches} batches", "swap_s": swap_load}
            | {"held": 2 * model_bytes}
        )
    return rows


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16], help="the N to run")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16], help="rows = swap batch")
    ap.add_argument("--per-layer", type=int, default=3, help="experts per MoE layer an adapter has")
    ap.add_argument("--check", type=int, default=8, help="requests asserted equal across methods")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per method (the median)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import jax

    from esft_jax.app.runtime import peak_rss_bytes
    from esft_jax.checkpoint import load_checkpoint
    from esft_jax.report import markdown_table

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True)
    print(
        f"{' '.join(cpu.stdout.split()[2:]) or 'CPU'}; {os.cpu_count()} cores; "
        f"jax {jax.__version__} {jax.default_backend()}"
    )
    print(
        f"built-in tiny MoE; {args.requests} requests, prompts BOS + 20-120 random ids, "
        f"{args.max_tokens} greedy tokens max; adapters of {args.per_layer} experts per MoE layer; "
        f"median of {args.reps} timed runs after a warm-up run of the same workload (compiles)"
    )
    wall = time.perf_counter()
    cfg, params_np = load_checkpoint(MODEL)
    params = jax.device_put(params_np)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.adapters:
            for r in _rows(cfg, params_np, params, n, args, Path(tmp)):
                table.append(
                    [
                        str(r["n"]),
                        r["method"],
                        str(r["rows"]),
                        str(r["tokens"]),
                        f"{r['s']:.2f}",
                        f"{r['warm']:.0f}",
                        r["calls"],
                        f"{r['tokens'] / r['s']:.0f}",
                        f"{r['requests'] / r['s']:.1f}",
                        "" if r["swap_s"] is None else f"{r['swap_s']:.2f}",
                        _mib(r["held"]),
                        _mib(r["n"] * _nbytes(params_np)),
                        f"{r['same']}/{r['requests']}",
                    ]
                )
    head = ["N", "method", "rows / batch", "tokens", "wall s", "warm-up s", "calls", "tokens/s"]
    head += ["requests/s", "swap s", "params held MiB", "N merged copies MiB", "same tokens"]
    print(markdown_table(head, table, right=[False, False] + [True] * (len(head) - 2)))
    rss = peak_rss_bytes() / 2**30
    print(f"whole run {time.perf_counter() - wall:.0f} s, peak RSS {rss:.2f} GiB (one process)")


if __name__ == "__main__":
    main()

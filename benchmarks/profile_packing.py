"""`esft profile`'s cost at seq_len 256 and 4096 on the same token budget, documents packed into rows.

    .venv/bin/python benchmarks/profile_packing.py                    # the default budget, 32 x 4096
    .venv/bin/python benchmarks/profile_packing.py --old-steps 1      # and an estimate of the unpacked layout

The built-in tiny MoE on the built-in `intent` task (builtin/suite.py `write_suite`), batch_size 8.
Each configuration runs in its own process, so that its peak RSS is its own; wall time is the
`profile()` call, compilation included. `--old-steps N` times N steps of the unpacked layout (one
document per row, padded to 4096: profile._step on rows of one document) after one warm-up step
and extrapolates to the batches the budget needs: an estimate, not a run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from esft_jax.builtin.suite import write_suite
from esft_jax.checkpoint import load_checkpoint, load_tokenizer
from esft_jax.data.sources import read_samples
from esft_jax.report import markdown_table
from esft_jax.routing import profile

MODEL = Path(__file__).resolve().parent.parent / "esft_jax" / "builtin" / "tiny_moe"
BATCH = 8


def _documents(data: str, seq_len: int, budget: int):
    cfg, params = load_checkpoint(MODEL)
    samples, _ = read_samples(data, False)
    return (
        cfg,
        params,
        profile.sequences(
            samples, load_tokenizer(MODEL), cfg, seq_len=seq_len, token_budget=budget
        ),
    )


def run_packed(data: str, seq_len: int, budget: int) -> dict:
    cfg, params, seqs = _documents(data, seq_len, budget)
    start = time.perf_counter()
    stats = profile.collect(params, cfg, seqs, batch_size=BATCH, seq_len=seq_len, progress=False)
    row_len = profile.row_length(seqs, seq_len)
    return {
        "seconds": time.perf_counter() - start,
        "tokens": stats.tokens,
        "documents": stats.sequences,
        "row_len": row_len,
        "rows": len(profile.pack(seqs, row_len)),
    }


def run_unpacked(data: str, seq_len: int, budget: int, steps: int) -> dict:
    cfg, params, seqs = _documents(data, seq_len, budget)
    step = jax.jit(profile._step, static_argnames=("cfg", "max_docs", "with_routing"))
    batch = [jnp.asarray(a) for a in profile._rows([[s] for s in seqs[:BATCH]], BATCH, seq_len)]
    jax.block_until_ready(step(params, *batch, cfg, 1, False))
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(step(params, *batch, cfg, 1, False))
    per_step = (time.perf_counter() - start) / steps
    batches = -(-len(seqs) // BATCH)
    return {
        "seconds": per_step * batches,
        "tokens": sum(int(s.counted.sum()) for s in seqs),
        "documents": len(seqs),
        "row_len": seq_len,
        "rows": len(seqs),
    }


def _child(args: argparse.Namespace, data: str, seq_len: int, old: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        data,
        "--seq-len",
        str(seq_len),
        "--budget",
        str(args.budget),
        "--old-steps",
        str(args.old_steps if old else 0),
    ]
    return json.loads(
        subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--budget", type=int, default=32 * 4096, help="counted tokens (configs/profile.py)"
    )
    parser.add_argument(
        "--old-steps", type=int, default=0, help="time the unpacked layout at 4096 over N steps"
    )
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one configuration; its result and peak RSS as the last line
        result = (
            run_unpacked(args.child, args.seq_len, args.budget, args.old_steps)
            if args.old_steps
            else run_packed(args.child, args.seq_len, args.budget)
        )
        print(
            json.dumps(
                {**result, "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
            )
        )
        return

    cpu = subprocess.run(
        "lscpu | grep 'Model name'", shell=True, capture_output=True, text=True
    ).stdout
    cpu = " ".join(cpu.split())
    a = jnp.ones((2048, 2048), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, a))
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    print(
        f"{cpu}; fp32 2048^3 matmul {2 * 2048**3 / (time.perf_counter() - start) / 1e9:.0f} GFLOP/s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = str(write_suite(tmp) / "train" / "intent.jsonl")
        runs = {
            ("packed", 256): _child(args, data, 256, False),
            ("packed", 4096): _child(args, data, 4096, False),
        }
        if args.old_steps:
            runs[("unpacked (estimate)", 4096)] = _child(args, data, 4096, True)
    base = runs[("packed", 256)]["seconds"]
    print(f"budget {args.budget} tokens, batch_size {BATCH}, built-in tiny MoE on built-in intent")
    head = [
        "layout",
        "seq_len",
        "row length",
        "rows",
        "documents",
        "tokens",
        "wall s",
        "vs packed 256",
        "peak RSS GiB",
    ]
    print(
        markdown_table(
            head,
            [
                [
                    layout,
                    *map(str, (seq_len, r["row_len"], r["rows"], r["documents"], r["tokens"])),
                    f"{r['seconds']:.1f}",
                    f"{r['seconds'] / base:.2f}x",
                    f"{r['rss_gib']:.2f}",
                ]
                for (layout, seq_len), r in runs.items()
            ],
        )
    )


if __name__ == "__main__":
    main()

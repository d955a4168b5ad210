"""Does `esft plan` predict the memory a train step really uses? Plan, then run the same compiled step
with real arrays and measure the process's resident memory.

    .venv/bin/python benchmarks/plan_check.py            # the "large" benchmark model, batch 8 x 512

Measured = peak RSS while allocating the model, optimizer state and batch and running two steps, minus
the RSS just before (after compiling, with the peak counter reset via /proc/self/clear_refs), so
compiler memory and the Python runtime are not counted. On a GPU/TPU the device's own counters
instead (memory_stats: peak bytes in use minus bytes in use before; benchmarks/device_check.sh).
Each method runs in its own child process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import train_step  # the benchmark model sizes


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(size: str, method_name: str, batch: int, seq: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from esft_jax.app import config_files
    from esft_jax.model import ModelConfig, init_params
    from esft_jax.train import plan
    from esft_jax.train.method import build_method
    from esft_jax.train.optimizer import Optim, make_optimizer
    from esft_jax.train.settings import MethodSettings

    cfg = ModelConfig(model_type="deepseek_v2", **train_step.SIZES[size])
    method = build_method(method_name, MethodSettings(), cfg)
    optim = Optim(
        **config_files.load_file(
            str(Path(__file__).parents[1] / "configs" / "train.py")
        ).optim.to_dict()
    )
    compiled, _, _ = plan.lower_train_step(
        cfg, method, {"data": 1}, batch_size=batch, seq_len=seq, optim=optim
    )
    predicted = plan.resident_bytes(compiled)
    device = jax.devices()[0]
    on_host = device.platform == "cpu"
    if on_host:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM)
        before = _status_kb("VmRSS") * 1024
    else:
        before = device.memory_stats()["bytes_in_use"]
    frozen = init_params(cfg, jax.random.key(0))
    trainable = method.init(frozen)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "opt_state": make_optimizer(optim).init(trainable),
    }
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, batch, seq)).astype(np.int32)
    batch_arrays = {
        "tokens": tokens,
        "segment_ids": np.ones_like(tokens),
        "loss_mask": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape).copy(),
    }
    for _ in range(2):
        state, metrics = compiled(state, frozen, batch_arrays)
    jax.block_until_ready(metrics)
    peak = _status_kb("VmHWM") * 1024 if on_host else device.memory_stats()["peak_bytes_in_use"]
    return {"predicted": predicted, "measured": peak - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="large", choices=list(train_step.SIZES))
    ap.add_argument("--methods", default="fft,esft,lora")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.size, args.one, args.batch, args.seq)))
        return
    from esft_jax.report import markdown_table

    rows = []
    for m in args.methods.split(","):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                m,
                "--size",
                args.size,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(
            [
                m,
                f"{r['predicted'] / 2**20:.0f}",
                f"{r['measured'] / 2**20:.0f}",
                f"{r['predicted'] / r['measured']:.2f}",
            ]
        )
    import jax

    print(
        f"model {args.size}, batch {args.batch} x {args.seq}, float32, 1 device "
        f"({jax.devices()[0].device_kind})"
    )
    print(
        markdown_table(["method", "planned MiB", "measured MiB", "planned / measured"], rows),
        end="",
    )


if __name__ == "__main__":
    main()

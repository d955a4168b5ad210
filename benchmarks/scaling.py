"""Benchmark 4: esft-jax train-step time (FFT and ESFT-Token) as the number of experts, the sequence
length and the batch grow, from the `issue` model of train_step.py (64 experts, batch 8 x 256).

    .venv/bin/python benchmarks/scaling.py
Experts grow at a fixed active width (top-6 of width 128); each point runs in its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys

from train_step import SIZES

POINTS = [  # (label, config changes, batch, seq)
    ("base", {}, 8, 256),
    ("E=16", {"n_routed_experts": 16}, 8, 256),
    ("E=256", {"n_routed_experts": 256}, 8, 256),
    ("seq 512", {}, 8, 512),
    ("seq 1024", {}, 8, 1024),
    ("batch 16", {}, 16, 256),
]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        import train_step

        label, method = sys.argv[2], sys.argv[3]
        changes, batch, seq = next((c, b, s) for name, c, b, s in POINTS if name == label)
        print(
            json.dumps(
                train_step.run_jax({**SIZES["issue"], **changes}, method, batch, seq, reps=3)
            )
        )
        return
    from esft_jax.report import markdown_table

    rows = []
    for label, changes, batch, seq in POINTS:
        step = {}
        for method in ("fft", "esft_token"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", label, method],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            step[method] = json.loads(out.strip().splitlines()[-1])["step_s"]
        tokens = batch * seq
        rows.append(
            [
                label,
                str(changes.get("n_routed_experts", 64)),
                f"{batch} x {seq}",
                f"{step['fft']:.3f}",
                f"{tokens / step['fft']:.0f}",
                f"{step['esft_token']:.3f}",
                f"{tokens / step['esft_token']:.0f}",
                f"{step['esft_token'] / step['fft']:.2f}",
            ]
        )
    print(
        markdown_table(
            [
                "point",
                "experts",
                "batch x seq",
                "FFT s/step",
                "FFT tokens/s",
                "ESFT s/step",
                "ESFT tokens/s",
                "ESFT / FFT",
            ],
            rows,
        ),
        end="",
    )


if __name__ == "__main__":
    main()

"""`esft run`'s training variants side by side (`--config.variant_devices=2` on 8 simulated devices)
against one after another in the same 2-device environment, on the built-in model and task.

    .venv/bin/python benchmarks/sweep.py                # 4 variants, 20 steps each, 2 rounds
    .venv/bin/python benchmarks/sweep.py --steps 50 --rounds 1

The four variants of the study (ESFT-Token, ESFT-Gate, LoRA, FFT) train the built-in model on a
data=2 mesh each; the two ways take turns, each round in fresh run directories, and every adapter
is compared between them (bytes). Wall seconds of the whole launch (app/launch.py run_local).
(On CPU the simulated device count sets XLA's threading: variants are compared in the same one.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

from safetensors.numpy import load_file  # noqa: E402

from esft_jax.app import config_files, launch  # noqa: E402
from esft_jax.app import study_steps as steps  # noqa: E402
from esft_jax.app.commands import run as experiment  # noqa: E402
from esft_jax.app.commands.select import select_experts  # noqa: E402
from esft_jax.report import markdown_table  # noqa: E402
from esft_jax.routing.sources import load_stats  # noqa: E402

METHODS = ("esft_token", "esft_gate", "lora", "fft")


def _config(root: Path, run: str, steps: int):
    return config_files.load(
        "configs/experiments/builtin.py",
        [
            f"suite_dir={root / 'suite'}",
            f"run_dir={root / run}",
            f"methods={METHODS}",
            "mesh.data=2",
            f"train=('steps={steps}', 'batch_size=8', 'data.seq_len=256', 'log_every={steps}', "
            f"'eval_every={steps}', 'checkpoint_every={steps}', 'data.validation_fraction=0.02')",
            "profile.token_budget=4096",
        ],
    )


def _experts(c, root: Path) -> None:
    """Profile and select once (root/profile); every run directory gets the expert configs."""
    profile = root / "profile"
    if not profile.is_dir():
        steps.profile_task(c, root / "suite", profile)
    stats = load_stats(profile)
    for name, spec in c.selections.items():
        select_experts(stats, spec, c.seed).save(Path(c.run_dir) / f"experts_{name}.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cpu = " ".join(
        subprocess.run(
            "lscpu | grep 'Model name'", shell=True, capture_output=True, text=True
        ).stdout.split()
    )
    print(f"{cpu}; {os.cpu_count()} cores; 8 simulated CPU devices")
    from esft_jax.builtin import suite as builtin_suite

    rows, seconds = [], {1: [], 4: []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        builtin_suite.write_suite(root / "suite", seed=0)
        for r in range(args.rounds):
            adapters = {}
            for at_once in (4, 1):  # taking turns
                c = _config(root, f"run{r}_{at_once}", args.steps)
                Path(c.run_dir).mkdir(parents=True)
                _experts(c, root)
                variants = experiment._variants(c, Path(c.run_dir), root / "suite")
                start = time.perf_counter()
                launch.run_local(variants, launch.device_groups(2)[:at_once])
                seconds[at_once].append(time.perf_counter() - start)
                adapters[at_once] = [
                    load_file(v.workdir / "adapter" / "adapter.safetensors") for v in variants
                ]
            same = all(
                a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
                for a, b in zip(adapters[1], adapters[4])
            )
            rows.append(
                [
                    str(r + 1),
                    f"{seconds[1][-1]:.1f}",
                    f"{seconds[4][-1]:.1f}",
                    f"{seconds[1][-1] / seconds[4][-1]:.2f}x",
                    "yes" if same else "NO",
                ]
            )
    head = ["round", "one by one s", "side by side s", "speed-up", "adapters equal"]
    print(f"{len(METHODS)} variants ({', '.join(METHODS)}), {args.steps} steps each")
    print(markdown_table(head, rows, right=[True, True, True, True, False]))


if __name__ == "__main__":
    main()

"""Running a study's training variants: one after another, side by side on groups of this machine's
devices, or as SLURM jobs through submitit.

A variant is one `esft train` command and its workdir; it is done when <workdir>/summary.json
exists, so a rerun launches only the variants still missing (a half-finished sweep resumes where it
stopped). Each variant writes its stdout and stderr to <workdir>/train.log (appended to across
reruns), never to a pipe: a pipe nobody reads fills at 64 KiB and blocks the child.

Side by side (`variant_devices` > 0): the devices are cut into groups of that many and each running
variant gets one, through its environment: on CPU a simulated device count (XLA_FLAGS), on CUDA GPUs
CUDA_VISIBLE_DEVICES. Variants are independent processes, so each computes exactly what it computes
alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import submitit

from esft_jax.app.config_files import ConfigFileError
from esft_jax.errors import UserError

TRAIN_LOG = "train.log"  # a variant's stdout and stderr, in its workdir
SUMMARY = "summary.json"  # written by `esft train` at its end: the variant is done
LOG_TAIL_LINES = 15
POLL_SECONDS = 0.2
LAUNCHES = ("local", "slurm", "print")


class ExperimentError(UserError, RuntimeError):
    """A step of the study failed (a training child exited non-zero)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  # as the error names it: the method, or study/method in a sweep
    argv: tuple[str, ...]  # its `esft train` command
    workdir: Path

    @property
    def done(self) -> bool:
        return (self.workdir / SUMMARY).is_file()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` non-empty lines of a log; progress-bar redraws (carriage returns) split lines."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 64 * 1024))
        text = f.read().decode(errors="replace")
    return "\n".join(
        [line for line in text.replace("\r", "\n").split("\n") if line.strip()][-lines:]
    )


def _failure(variant: Variant, returncode: int) -> ExperimentError:
    log = variant.workdir / TRAIN_LOG
    why = f"exit status {returncode}" if returncode else f"no {SUMMARY} written"
    tail = log_tail(log) if log.is_file() else "(no log)"
    return ExperimentError(f"training {variant.name} failed ({why}); last lines of {log}:\n{tail}")


def device_groups(variant_devices: int) -> list[dict[str, str]]:
    """The environment additions of each variant that may run at once: one group of
    `variant_devices` devices each (0: one variant at a time, on every device)."""
    if variant_devices == 0:
        return [{}]
    n, backend = jax.device_count(), jax.default_backend()
    if variant_devices > n:
        raise ConfigFileError(
            f"--config.variant_devices={variant_devices}: this machine has {n} {backend} devices"
        )
    groups = n // variant_devices
    if backend == "cpu":
        flags = re.sub(
            r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
        )
        count = f"--xla_force_host_platform_device_count={variant_devices}"
        return [{"XLA_FLAGS": f"{flags} {count}".strip()}] * groups
    if backend == "gpu":
        ids = [str(d.id) for d in jax.local_devices()]
        return [
            {"CUDA_VISIBLE_DEVICES": ",".join(ids[g * variant_devices : (g + 1) * variant_devices])}
            for g in range(groups)
        ]
    raise ConfigFileError(
        f"--config.variant_devices={variant_devices}: side-by-side variants need CPU or CUDA "
        f"devices; this run has {backend} (use 0, or --config.launch=slurm)"
    )


def _start(variant: Variant, env: dict[str, str]) -> subprocess.Popen:
    variant.workdir.mkdir(parents=True, exist_ok=True)
    with (variant.workdir / TRAIN_LOG).open("ab") as log:  # the child holds its own descriptor
        return subprocess.Popen(
            variant.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )


def run_local(variants: Sequence[Variant], groups: Sequence[dict[str, str]]) -> dict[str, float]:
    """Run the variants not done, as many at once as there are device `groups`; wall seconds of
    each. A failure is raised once the others have finished (their work is kept)."""
    pending = [v for v in variants if not v.done]
    free, running, seconds, failed = list(range(len(groups))), {}, {}, []
    while pending or running:
        while pending and free:
            variant, group = pending.pop(0), free.pop(0)
            running[_start(variant, groups[group])] = (variant, group, time.perf_counter())
        time.sleep(POLL_SECONDS)
        for proc in [p for p in running if p.poll() is not None]:
            variant, group, start = running.pop(proc)
            free.append(group)
            seconds[variant.name] = time.perf_counter() - start
            if proc.returncode != 0 or not variant.done:
                failed.append(_failure(variant, proc.returncode))
    if failed:
        raise failed[0]
    return seconds


def _run_logged(argv: Sequence[str], workdir: str) -> tuple[int, float]:
    """A SLURM job's body: the variant's command, its output appended to its train.log."""
    start = time.perf_counter()
    with (Path(workdir) / TRAIN_LOG).open("ab") as log:
        code = subprocess.run(list(argv), stdout=log, stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - start


def run_slurm(
    variants: Sequence[Variant], folder: Path, cluster: str, parameters: dict
) -> dict[str, float]:
    """Submit the variants not done as jobs of one submitit executor (cluster "slurm", or
    submitit's "local" / "debug" executors) and wait for all; wall seconds of each."""
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster or None)
    executor.update_parameters(**parameters)
    pending = [v for v in variants if not v.done]
    for v in pending:
        v.workdir.mkdir(parents=True, exist_ok=True)
    jobs = [(v, executor.submit(_run_logged, v.argv, str(v.workdir))) for v in pending]
    seconds, failed = {}, []
    for variant, job in jobs:
        code, seconds[variant.name] = job.result()
        if code != 0 or not variant.done:
            failed.append(_failure(variant, code))
    if failed:
        raise failed[0]
    return seconds


def train(c: ml_collections.ConfigDict, variants: Sequence[Variant]) -> None:
    """Run the variants not done as the study or sweep `c` says (launch, variant_devices, slurm);
    each new summary gets its wall seconds."""
    if c.launch == "slurm":
        settings = c.slurm.to_dict()
        cluster, folder = settings.pop("cluster"), settings.pop("folder")
        parameters = {k: v for k, v in settings.items() if v not in ("", 0)}
        seconds = run_slurm(
            variants, Path(folder or Path(c.run_dir) / "slurm"), cluster, parameters
        )
    else:
        seconds = run_local(variants, device_groups(c.variant_devices))
    for v in variants:
        if v.name in seconds:
            summary = json.loads((v.workdir / SUMMARY).read_text())
            summary.update(wall_seconds=seconds[v.name])
            (v.workdir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")

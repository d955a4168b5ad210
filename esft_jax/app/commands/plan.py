"""`esft plan`: per-device memory of a train step for each method and device count."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import ml_collections

from esft_jax.app import checks, config_files, runtime
from esft_jax.app.checks import number, one_of, whole
from esft_jax.app.commands.train import optim
from esft_jax.app.config_files import ConfigFileError
from esft_jax.train import plan
from esft_jax.train.method import METHODS as TRAIN_METHODS
from esft_jax.train.settings import MethodSettings


def check(c: ml_collections.ConfigDict) -> None:
    methods = c.methods.split(",")
    for method in methods:
        if method not in TRAIN_METHODS:
            raise ConfigFileError(
                f"--config.methods: {method!r} is not one of {', '.join(TRAIN_METHODS)}"
            )
    one_of(c, "mesh_axis", ("fsdp", "expert"))
    for key in ("batch_size", "lora_rank"):
        whole(c, key)
    whole(c, "micro_batch", 0)
    whole(c, "seq_len", 0)  # 0: resolved against the model (within_positions)
    number(c, "device_memory_gb", 0, low_open=True)
    for n in c.devices:
        if not (isinstance(n, int) and n >= 1):
            raise ConfigFileError(
                f"--config.devices={tuple(c.devices)}: expected whole numbers >= 1"
            )
        rows = n * c.micro_batch if c.micro_batch else n
        if c.mesh_axis == "fsdp" and c.batch_size % rows:
            raise ConfigFileError(
                f"--config.batch_size={c.batch_size}: does not split into micro-batches of "
                f"{rows} rows ({n} devices x --config.micro_batch={c.micro_batch or 'all'})"
            )


def run(c: ml_collections.ConfigDict) -> None:
    """Per-device memory of a train step for each method and device count (compiled, not run)."""
    need = max(c.devices)
    if (
        not c.topology and jax.device_count() < need
    ):  # simulate the devices: re-run with XLA's host count set
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={need}".strip()
        code = subprocess.call(
            [sys.executable, "-m", "esft_jax.app.cli", *sys.argv[1:]],
            env={**os.environ, "XLA_FLAGS": flags},
        )
        raise SystemExit(code)
    cfg = runtime.model_config(c) if c.checkpoint else config_files.model_config(c.model)
    checks.within_positions(c, "seq_len", cfg)
    print(
        plan.report(
            cfg,
            c.methods.split(","),
            tuple(c.devices),
            c.mesh_axis,
            batch_size=c.batch_size,
            micro_batch=c.micro_batch,
            seq_len=c.seq_len,
            optim=optim(c),
            device_memory_gb=c.device_memory_gb,
            topology=c.topology,
            settings=MethodSettings(
                expert_config=c.expert_config,
                expert_fraction=c.expert_fraction,
                lora_rank=c.lora_rank,
            ),
        )
    )

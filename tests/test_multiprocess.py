"""Two cooperating processes (jax.distributed over gloo on localhost) train and profile like one process
with the same global batch: the same adapter, losses, checkpoints and routing statistics. Each of the
two processes reads only its own data shard; the single process reads both."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import train_fixtures as fx
from numerics import assert_adam_close, assert_float32_close, model_roundings
from safetensors.numpy import load_file

from esft_jax.app import cli
from esft_jax.app.commands import train as loop
from esft_jax.routing.sources import STATS_FILE
from esft_jax.routing.stats import RoutingStats


def _run_two_processes(args: list[str]) -> None:
    """`esft <args>` as 2 cooperating processes (1 CPU device each) on a localhost coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1"),
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "esft_jax.app.cli",
                *args,
                "--config.mesh.data=2",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                f"--config.distributed.coordinator=127.0.0.1:{port}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    # one process reads both data shards; each of the two processes reads only its own (data.shards=0)
    # 4 steps: checkpoints at 2 and 4, validation at 3 and 4
    one = fx.train_config(tmp_path, "esft", workdir=tmp_path / "one", steps=4, **{"data.shards": 2})
    loop.train(one, progress=False)

    base = [
        "train",
        "--config",
        "configs/train.py:esft",
        f"--config.checkpoint={one.checkpoint}",
        f"--config.data.train={one.data.train}",
        f"--config.expert_config={one.expert_config}",
        f"--config.workdir={tmp_path / 'two'}",
    ]
    same = [
        f"--config.{k}={one[k]}"
        for k in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every")
    ]
    same += [f"--config.data.{k}={one.data[k]}" for k in ("seq_len", "validation_fraction")]
    same += [f"--config.optim.{k}={one.optim[k]}" for k in ("lr", "warmup_steps", "weight_decay")]
    _run_two_processes([*base, *same])

    a, b = (
        load_file(tmp_path / "one" / "adapter" / "adapter.safetensors"),
        load_file(tmp_path / "two" / "adapter" / "adapter.safetensors"),
    )
    assert a.keys() == b.keys()
    n_roundings = model_roundings(fx.tiny_config())
    for name in a:  # data parallel over 2 devices sums the gradient in another order
        assert_adam_close(b[name], a[name], n_roundings, lr=one.optim.lr, steps=one.steps)
    curves = [
        [
            json.loads(ln)["loss"]
            for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in ("one", "two")
    ]
    assert_float32_close(curves[1], curves[0], n_roundings)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == sorted(
        os.listdir(tmp_path / "one" / "checkpoints")
    )

    # The two processes' checkpoint holds both shards' positions: one process resumes it (keeping its
    # 2 shards) and finishes like the single-process run.
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(one.steps))
    resumed = fx.train_config(tmp_path, "esft", workdir=tmp_path / "resumed", steps=one.steps)
    loop.train(resumed, progress=False)
    c = load_file(tmp_path / "resumed" / "adapter" / "adapter.safetensors")
    for name in a:
        assert_adam_close(c[name], a[name], n_roundings, lr=one.optim.lr, steps=one.steps)


@pytest.mark.slow
def test_two_processes_profile_like_one(tmp_path):
    ckpt, data = (
        fx.base_checkpoint(tmp_path / "base"),
        fx.task_dataset(tmp_path / "task.jsonl", n=40),
    )
    common = [
        "--config",
        "configs/profile.py",
        f"--config.checkpoint={ckpt}",
        f"--config.data={data}",
        "--config.token_budget=1500",
        "--config.seq_len=64",
        "--config.batch_size=4",
        "--config.progress=False",
    ]
    # one process reads both data shards; each of the two processes reads only its own
    assert (
        cli.main(["profile", *common, "--config.shards=2", f"--config.out_dir={tmp_path / 'one'}"])
        == 0
    )
    _run_two_processes(["profile", *common, f"--config.out_dir={tmp_path / 'two'}"])
    one, two = (
        RoutingStats.load(tmp_path / "one" / STATS_FILE),
        RoutingStats.load(tmp_path / "two" / STATS_FILE),
    )
    assert one.tokens == two.tokens > 0
    np.testing.assert_array_equal(two.counts, one.counts)
    np.testing.assert_array_equal(two.coactivation, one.coactivation)
    # the forward, then a sum over tokens
    n_roundings = model_roundings(fx.tiny_config()) + np.sqrt(one.tokens)
    assert_float32_close(two.gate_sum, one.gate_sum, n_roundings)
    assert_float32_close(two.seq_gate_frac, one.seq_gate_frac, n_roundings)

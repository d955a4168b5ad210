"""app/launch.py: variants side by side on device groups, as submitit jobs, and resumed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import pytest

from esft_jax.app import launch
from esft_jax.app.config_files import ConfigFileError

# A stand-in for `esft train`: records when it ran and what devices it saw, then its summary.
CHILD = (
    "import json, os, sys, time, pathlib\n"
    "w = pathlib.Path(sys.argv[1])\n"
    "start = time.time(); time.sleep(float(sys.argv[2]))\n"
    "if sys.argv[3] != '0': print('boom', file=sys.stderr); sys.exit(int(sys.argv[3]))\n"
    "(w / 'ran.json').write_text(json.dumps(dict(start=start, end=time.time(),"
    " xla=os.environ.get('XLA_FLAGS', ''))))\n"
    "(w / 'summary.json').write_text('{}')\n"
)


def _variant(root: Path, name: str, sleep: float = 0.5, exit_code: int = 0) -> launch.Variant:
    workdir = root / name
    argv = (sys.executable, "-c", CHILD, str(workdir), str(sleep), str(exit_code))
    return launch.Variant(name, argv, workdir)


def _ran(v: launch.Variant) -> dict:
    return json.loads((v.workdir / "ran.json").read_text())


def _most_at_once(runs: list[dict]) -> int:
    return max(sum(r["start"] <= t["start"] < r["end"] for r in runs) for t in runs)


def test_device_groups_cut_the_simulated_devices():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    groups = launch.device_groups(2)
    assert len(groups) == jax.device_count() // 2
    assert all(
        g["XLA_FLAGS"].split().count("--xla_force_host_platform_device_count=2") == 1
        for g in groups
    )
    assert "device_count=8" not in groups[0]["XLA_FLAGS"]
    assert launch.device_groups(0) == [{}]
    with pytest.raises(ConfigFileError, match="--config.variant_devices=99: this machine has"):
        launch.device_groups(99)


def test_side_by_side_runs_as_many_at_once_as_groups_and_resumes(tmp_path):
    variants = [_variant(tmp_path, f"v{i}") for i in range(4)]
    groups = [{"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}] * 2
    seconds = launch.run_local(variants, groups)
    runs = [_ran(v) for v in variants]
    assert sorted(seconds) == [v.name for v in variants] and min(seconds.values()) >= 0.5
    assert _most_at_once(runs) == 2  # two groups: two at a time, never more
    assert {r["xla"] for r in runs} == {"--xla_force_host_platform_device_count=2"}
    (variants[1].workdir / "summary.json").unlink()  # a half-finished sweep
    assert list(launch.run_local(variants, groups)) == ["v1"]  # only what is missing runs


def test_one_failure_is_raised_after_the_others_finish(tmp_path):
    variants = [_variant(tmp_path, "bad", 0.1, exit_code=3), _variant(tmp_path, "good", 1.0)]
    with pytest.raises(launch.ExperimentError) as failed:
        launch.run_local(variants, [{}, {}])
    log = tmp_path / "bad" / launch.TRAIN_LOG
    assert str(failed.value) == f"training bad failed (exit status 3); last lines of {log}:\nboom"
    assert variants[1].done  # the other one finished, its work kept


def test_submitit_jobs_run_every_variant_not_done(tmp_path):
    variants = [_variant(tmp_path, f"v{i}", 0.1) for i in range(3)]
    seconds = launch.run_slurm(variants, tmp_path / "slurm", "local", {"timeout_min": 5})
    assert sorted(seconds) == ["v0", "v1", "v2"] and all(v.done for v in variants)
    (variants[2].workdir / "summary.json").unlink()
    assert list(launch.run_slurm(variants, tmp_path / "slurm", "local", {"timeout_min": 5})) == [
        "v2"
    ]
    failing = [_variant(tmp_path, "bad", 0.1, exit_code=4)]
    with pytest.raises(launch.ExperimentError, match="training bad failed .exit status 4."):
        launch.run_slurm(failing, tmp_path / "slurm", "local", {"timeout_min": 5})


def _sweep(root: Path, run_name: str) -> tuple:
    """Four `esft train` variants of a tiny study (ESFT x 2, LoRA, FFT), each on a data=2 mesh of
    2 devices; (the config, the variants)."""
    import train_fixtures as fx

    from esft_jax.app import config_files
    from esft_jax.app.commands import run as experiment

    base, suite, run = root / "base", root / "suite", root / run_name
    if not base.exists():
        fx.base_checkpoint(base)
        (suite / "train").mkdir(parents=True)
        fx.task_dataset(suite / "train" / "intent.jsonl")
    run.mkdir()
    for name in ("token", "gate"):
        fx.EXPERTS.save(run / f"experts_{name}.json")
    c = config_files.load(
        "configs/experiments/builtin.py",
        [
            f"checkpoint={base}",
            f"suite_dir={suite}",
            f"run_dir={run}",
            "methods=('esft_token', 'esft_gate', 'lora', 'fft')",
            "mesh.data=2",
            "variant_devices=2",
            "train=('steps=2', 'batch_size=2', 'data.seq_len=64', 'log_every=1', "
            "'eval_every=2', 'checkpoint_every=2', 'data.validation_fraction=0.1')",
        ],
    )
    return c, experiment._variants(c, run, suite)


@pytest.mark.slow  # eight training processes
def test_a_sweep_side_by_side_trains_the_adapters_one_by_one_does(tmp_path):
    """4 variants, 2 of 8 simulated devices each, side by side (`esft run`'s variant_devices=2)
    and one at a time in the same 2-device environment: the same adapters, byte for byte. (On CPU
    the simulated device count sets XLA's threading, so the environments must match.)"""
    from safetensors.numpy import load_file

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    c, side_by_side = _sweep(tmp_path, "side_by_side")
    launch.train(c, side_by_side)
    _, one_by_one = _sweep(tmp_path, "one_by_one")
    launch.run_local(one_by_one, launch.device_groups(c.variant_devices)[:1])
    adapters = [
        {v.name: load_file(v.workdir / "adapter" / "adapter.safetensors") for v in variants}
        for variants in (side_by_side, one_by_one)
    ]
    assert list(adapters[0]) == ["esft_token", "esft_gate", "lora", "fft"]
    for name, tensors in adapters[1].items():
        assert tensors.keys() == adapters[0][name].keys()
        for key, value in tensors.items():
            assert value.tobytes() == adapters[0][name][key].tobytes(), (name, key)

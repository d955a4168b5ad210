"""A training run is never lost and never silently corrupted: values checked up front, a divergence
guard, resume rules against the saved config, unreadable checkpoints skipped, failed saves reported,
and `kill -9` at any point followed by the same command giving the uninterrupted run's adapter."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import train_fixtures as fx

from esft_jax.app import cli, config_files, resume
from esft_jax.app.commands import train as loop
from esft_jax.app.commands.train_checks import check_with_model
from esft_jax.checkpoint.adapter import read_adapter
from esft_jax.checkpoint.train_state import TrainCheckpoints
from esft_jax.expert_config import ExpertConfig

# the reference run: checkpoints after every step, all kept
RUN = {"steps": 4, "checkpoint_every": 1, "keep_checkpoints": 4, "eval_every": 2}
CLI_KEYS = (
    "checkpoint",
    "data.train",
    "expert_config",
    "data.seq_len",
    "batch_size",
    "steps",
    "data.validation_fraction",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "optim.lr",
    "optim.warmup_steps",
    "optim.weight_decay",
    "workdir",
)


def _get(c, key: str):
    for name in key.split("."):
        c = c[name]
    return c


def _args(c, **changes) -> list[str]:
    """The `esft train` command line of config `c`, with `changes`."""
    values = {key: _get(c, key) for key in CLI_KEYS} | changes
    return [
        "train",
        "--config",
        "configs/train.py:esft",
        *(f"--config.{k}={v}" for k, v in values.items()),
    ]


def _train(c, capsys, **changes) -> tuple[int, str]:
    code = cli.main(_args(c, **changes))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _errors(output: str) -> list[str]:
    return [
        ln for ln in output.replace("\r", "\n").splitlines() if "error:" in ln
    ]  # not tqdm's bar


def _adapter(workdir: Path) -> dict:
    return read_adapter(workdir / "adapter")[0]


def _metrics(workdir: Path) -> list[dict]:
    records = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in records]


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same_run(workdir: Path, reference: Path) -> None:
    a, b = _adapter(reference), _adapter(workdir)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert _metrics(workdir) == _metrics(reference)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(config, workdir) of an uninterrupted reference run."""
    root = tmp_path_factory.mktemp("reliability")
    c = fx.train_config(root, workdir=str(root / "reference"), **RUN)
    loop.train(c, progress=False)
    return c, root / "reference"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("batch_size", 0, "--config.batch_size=0: expected a whole number >= 1"),
        ("grad_accum", 0, "--config.grad_accum=0"),
        ("steps", -5, "--config.steps=-5"),
        ("checkpoint_every", 0, "--config.checkpoint_every=0"),
        ("log_every", 0, "--config.log_every=0"),
        ("eval_every", 0, "--config.eval_every=0"),
        (
            "data.seq_len",
            "2 * positions",
            "--config.data.seq_len={}: longer than the model's {} positions",
        ),
        ("optim.lr", -1.0, "--config.optim.lr=-1.0: expected a number >= 0"),
        ("method", "sft", "--config.method='sft': expected one of esft, fft, lora"),
    ],
)
def test_out_of_range_values_are_refused(key, value, message):
    c, cfg = config_files.load_file("configs/train.py:esft"), fx.tiny_config()
    c.expert_config, c.data.seq_len = "experts.json", 64
    if value == "2 * positions":
        value, message = (
            2 * cfg.max_position_embeddings,
            message.format(2 * cfg.max_position_embeddings, cfg.max_position_embeddings),
        )
    config_files.apply_overrides(c, [f"{key}={value!r}"])
    with pytest.raises(config_files.ConfigFileError, match="^" + re.escape(message)):
        check_with_model(c, cfg)


def test_a_refused_value_writes_nothing(tmp_path, capsys):
    c = fx.train_config(tmp_path)
    code, output = _train(c, capsys, batch_size=0)
    assert code == 2 and _errors(output) == [
        "esft train: error: --config.batch_size=0: expected a whole number >= 1"
    ]
    assert not Path(c.workdir).exists()


def test_divergence_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    # step 1 moves every weight by ~1e38; step 2's loss is nan. Step 2 is not a logged step: the
    # check before its checkpoint save stops the run.
    c = fx.train_config(tmp_path, steps=4, checkpoint_every=1, log_every=3)
    code, output = _train(c, capsys, **{"optim.lr": 1e38})
    checkpoints = Path(c.workdir) / "checkpoints"
    assert code == 1
    assert _errors(output) == [
        "esft train: error: step 2: loss is nan (grad_norm nan); stopped, the latest "
        "checkpoint (step 1) is kept; lower --config.optim.lr"
    ], output
    assert sorted(p.name for p in checkpoints.iterdir()) == ["1"]
    assert (
        not (Path(c.workdir) / "adapter").exists()
        and not (Path(c.workdir) / "metrics.jsonl").exists()
    )
    latest = TrainCheckpoints(checkpoints, 1, 4)
    step, state, _ = latest.restore(None)
    latest.close()
    assert step == 1 and int(state["step"]) == 1
    assert all(np.isfinite(x).all() for x in _leaves(state))
    # the step that was saved is the huge one
    assert np.abs(_leaves(state["trainable"])[0]).max() > 1e37


def test_a_zero_gradient_warns_once(tmp_path, capsys):
    c = fx.train_config(
        tmp_path,
        steps=4,
        checkpoint_every=4,
        **{"optim.lr": 1e9, "optim.weight_decay": 0.0, "optim.schedule": "constant"},
    )
    loop.train(c, progress=False)
    err = capsys.readouterr().err
    grad_norms = [m["grad_norm"] for m in _metrics(Path(c.workdir))]
    assert grad_norms[0] > 0 and grad_norms[1:] == [0.0] * 3
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        "warning: step 2: the gradient norm is exactly 0 at lr 1e+09: training has stopped learning "
        "(a too large lr saturates the model); lower --config.optim.lr"
    ]


def test_a_batch_without_a_trained_token_is_told_apart_from_saturation(tmp_path, capsys):
    """Most samples' answers lie beyond seq_len (not all: that is refused up front), so some batches
    train no token: their zero gradient warns once as such, not as a too large lr."""
    rows = [{"prompt": "a", "completion": " b"}] + [{"prompt": "x" * 80, "completion": " y"}] * 15
    data = tmp_path / "long_prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = fx.train_config(
        tmp_path,
        steps=4,
        checkpoint_every=4,
        batch_size=1,
        **{"data.train": data, "data.seq_len": 32, "data.validation_fraction": 0.0},
    )
    loop.train(c, progress=False)
    metrics = _metrics(Path(c.workdir))
    empty = [m["step"] for m in metrics if m["tokens"] == 0]
    assert empty and all(m["grad_norm"] == 0 for m in metrics if m["tokens"] == 0), metrics
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        f"warning: step {empty[0]}: its batch holds no trained token (each answer in it lies beyond "
        "--config.data.seq_len), so it trained nothing; lengthen --config.data.seq_len or drop the "
        "samples whose prompts fill it"
    ]


def test_resume_refuses_other_settings_and_extends_on_the_saved_schedule(
    finished, tmp_path, capsys
):
    c, reference = finished
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    saved = (workdir / "config.json").read_bytes()
    refusal = (
        f"esft train: error: {workdir}/config.json: this workdir holds a run with other settings: "
    )

    code, output = _train(c, capsys, workdir=workdir, **{"optim.lr": 0.001, "data.seq_len": 32})
    assert code == 2 and _errors(output) == [
        refusal + "data.seq_len 64 -> 32, optim.lr 0.01 -> 0.001; use another --config.workdir"
    ]
    other_experts = fx.EXPERTS.experts | {2: [31]}
    path = ExpertConfig(other_experts).save(tmp_path / "other.json")
    code, output = _train(c, capsys, workdir=workdir, expert_config=path)
    assert code == 2 and _errors(output) == [
        refusal + "expert_config layer 2 [30] -> [31]; use another --config.workdir"
    ]
    code, output = _train(c, capsys, workdir=workdir, steps=6)
    assert code == 2 and _errors(output) == [
        refusal + "steps 4 -> 6, optim.steps 4 -> 6; add --config.extend=True "
        "to train on with the saved schedule, or use another --config.workdir"
    ]
    assert (workdir / "config.json").read_bytes() == saved

    # the same experts under another path, and settings that do not change the result: resumes
    same = fx.EXPERTS.save(tmp_path / "copy.json")
    code, output = _train(
        c, capsys, workdir=workdir, steps=6, extend=True, expert_config=same, log_every=2
    )
    assert code == 0 and f"resuming from step 4 ({workdir}/checkpoints)" in output
    records = _metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 6]
    # the cosine schedule over the saved 4 steps has ended
    final_lr = c.optim.lr * c.optim.end_lr_fraction
    np.testing.assert_allclose(records[-1]["lr"], final_lr, rtol=1e-6)
    resolved = json.loads((workdir / "config.json").read_text())
    assert (resolved["steps"], resolved["optim"]["steps"]) == (6, 4)


@pytest.mark.parametrize(
    "change, refused",
    [
        (
            {
                "log_every": 7,
                "checkpoint_every": 3,
                "keep_checkpoints": 1,
                "mesh.data": 2,
                "model.moe_strategy": "dense",
                "model.attention_impl": "blockwise",
                "model.scan_layers": True,
                "distributed.num_processes": 2,
                "data.shards": 0,
                "model.hidden_size": 8,
            },
            None,
        ),
        ({"seed": 1}, "seed 0 -> 1"),
        ({"model.dtype": "bfloat16"}, "model.dtype 'float32' -> 'bfloat16'"),
        ({"data.shards": 3}, "data.shards 2 -> 3"),
        (
            {"lora.rank": 4, "optim.schedule": "constant"},
            "lora.rank 8 -> 4, optim.schedule 'cosine' -> 'constant'",
        ),
    ],
)
def test_which_settings_a_resume_may_change(tmp_path, change, refused):
    saved = fx.train_config(tmp_path, **{"data.shards": 2})
    resume.save_run_files(saved.copy_and_resolve_references(), tmp_path, None)
    new = fx.train_config(tmp_path, **change)
    if (
        refused is None
    ):  # free settings (with a checkpoint, of model.* only dtype and capacity_factor count)
        assert (
            resume.resumed_config(new, tmp_path, None).to_dict()
            == new.copy_and_resolve_references().to_dict()
        )
    else:
        with pytest.raises(
            config_files.ConfigFileError, match=re.escape(f"other settings: {refused}; use another")
        ):
            resume.resumed_config(new, tmp_path, None)


@pytest.mark.parametrize("value, refused", [(None, False), (2.0, True)])
def test_a_model_setting_newer_than_the_saved_run_counts_as_its_default(tmp_path, value, refused):
    """A workdir saved before a model setting existed resumes when the setting keeps its default
    (what the older version did), and not when it is set to something else."""
    saved = fx.train_config(tmp_path)
    resume.save_run_files(saved.copy_and_resolve_references(), tmp_path, None)
    path = tmp_path / resume.CONFIG_FILE
    older = json.loads(path.read_text())
    del older["model"]["capacity_factor"]
    path.write_text(json.dumps(older))
    new = fx.train_config(tmp_path, **({} if value is None else {"model.capacity_factor": value}))
    if not refused:
        resume.resumed_config(new, tmp_path, None)
    else:
        with pytest.raises(
            config_files.ConfigFileError, match="model.capacity_factor <unset> -> 2.0"
        ):
            resume.resumed_config(new, tmp_path, None)


def test_an_unreadable_latest_checkpoint_is_skipped(finished, tmp_path, capsys):
    c, reference = finished
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    # killed after saving step 3 ... whose files are truncated
    shutil.rmtree(workdir / "checkpoints" / "4")
    for f in (workdir / "checkpoints" / "3").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    shutil.rmtree(workdir / "adapter")
    code, output = _train(c, capsys, workdir=workdir)
    assert code == 0
    warning = [ln for ln in output.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and warning[0].startswith(
        f"warning: {workdir}/checkpoints/3: cannot read this checkpoint"
    )
    assert warning[0].endswith(
        f"resuming from step 2, the unreadable one is kept as {workdir}/checkpoints/3.unreadable"
    )
    _assert_same_run(workdir, reference)

    for f in (workdir / "checkpoints").rglob("*"):  # none readable: one line naming the directory
        if f.is_file():
            f.write_bytes(b"")
    code, output = _train(c, capsys, workdir=workdir)
    assert code == 2 and len(_errors(output)) == 1
    assert _errors(output)[0].startswith(
        f"esft train: error: {workdir}/checkpoints: no checkpoint can be read (step 4: "
    )


def test_a_failed_save_is_one_line_and_the_earlier_checkpoints_resume(
    finished, tmp_path, capsys, monkeypatch
):
    import errno

    import orbax.checkpoint as ocp

    c, reference = finished
    workdir = tmp_path / "run"
    real = ocp.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_3(
        self, x, directory
    ):  # the data position of checkpoint 3 is written
        if Path(str(directory)).parent.name.startswith("3."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full_at_step_3)
    code, output = _train(c, capsys, workdir=workdir)
    assert code == 2 and "Traceback" not in output
    assert _errors(output) == [
        f"esft train: error: {workdir}/checkpoints/3: could not write the checkpoint: "
        f"[Errno 28] No space left on device; the earlier checkpoints are kept"
    ]
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", real)
    code, output = _train(c, capsys, workdir=workdir)  # space again: the same command goes on
    assert code == 0 and f"resuming from step 2 ({workdir}/checkpoints)" in output
    _assert_same_run(workdir, reference)


def _checkpoint_dirs(workdir: Path) -> tuple[int, bool]:
    """(committed checkpoints, whether a save is in progress) of a run's checkpoints directory."""
    names = [p.name for p in (workdir / "checkpoints").glob("*")]
    return sum(n.isdigit() for n in names), any(".orbax-checkpoint-tmp" in n for n in names)


@pytest.mark.slow
def test_kill_9_anywhere_then_the_same_command_ends_like_an_uninterrupted_run(
    finished, tmp_path, capsys
):
    c, reference = finished
    rng = np.random.default_rng(0)
    env = {
        **os.environ,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }  # children share every program
    # Four runs side by side. Trial i < 3 is killed a random delay after i committed checkpoints (0:
    # once the run has started, its config.json written); trial 3 the moment a save is in progress.
    trials = [
        {
            "workdir": tmp_path / f"trial{i}",
            "after": i,
            "delay": rng.uniform(0.0, 0.2),
            "start": None,
            "killed_at": None,
        }
        for i in range(4)
    ]
    for t in trials:
        t["child"] = subprocess.Popen(
            [sys.executable, "-m", "esft_jax.app.cli", *_args(c, workdir=t["workdir"])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    while any(t["child"].poll() is None and t["killed_at"] is None for t in trials):
        for i, t in enumerate(trials):
            if t["killed_at"] is not None or t["child"].poll() is not None:
                continue
            committed, saving = _checkpoint_dirs(t["workdir"])
            if (
                t["start"] is None
                and (t["workdir"] / "config.json").exists()
                and committed >= t["after"]
            ):
                t["start"] = time.monotonic()
            if t["start"] is not None and (
                saving if i == 3 else time.monotonic() - t["start"] >= t["delay"]
            ):
                os.kill(t["child"].pid, signal.SIGKILL)
                # (committed checkpoints, save in progress)
                t["killed_at"] = _checkpoint_dirs(t["workdir"])
        time.sleep(0.002)
    for i, t in enumerate(trials):
        t["child"].wait()
        assert t["child"].returncode == -signal.SIGKILL, f"trial {i}: the run ended before the kill"
        code, output = _train(c, capsys, workdir=t["workdir"])  # the same command again
        assert code == 0, output
        _assert_same_run(t["workdir"], reference)
    assert trials[3]["killed_at"][1], "trial 3 was not killed during a save"


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_same_command_resumes(tmp_path, capsys):
    c = fx.train_config(tmp_path, steps=60, checkpoint_every=5, eval_every=60, batch_size=2)
    # `esft train` with SIGINT's handler as in a terminal (a shell without job control starts
    # background jobs, and so this test's child, with SIGINT ignored)
    main = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from esft_jax.app.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", main, *_args(c)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = Path(c.workdir) / "checkpoints"
    while not (checkpoints / "5").is_dir() and child.poll() is None:
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)  # what Ctrl-C sends
    err = child.communicate(timeout=300)[1]
    assert child.returncode == 130 and "Traceback" not in err, err
    said = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("esft train:")]
    assert len(said) == 1, err
    stopped = re.fullmatch(
        r"esft train: interrupted at step (\d+); rerun to resume \(from the checkpoint of step (\d+)\)",
        said[0],
    )
    assert stopped, said
    step, kept = map(int, stopped.groups())
    assert 5 <= kept <= step < 60 and kept == max(int(p.name) for p in checkpoints.iterdir())
    code, output = _train(c, capsys)  # the same command again
    assert code == 0 and f"resuming from step {kept} ({checkpoints})" in output, output
    assert [m["step"] for m in _metrics(Path(c.workdir))] == list(range(1, 61))

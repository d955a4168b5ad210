"""`esft run` end to end on a tiny random model: every step, the table, the plots, and the cache."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import train_fixtures as fx

from esft_jax.app import cli, config_files, launch
from esft_jax.app import study_steps as steps
from esft_jax.app.commands import run as experiment
from esft_jax.app.runtime import RUNTIME_FIELDS
from esft_jax.builtin import suite as builtin_suite
from esft_jax.expert_config import ExpertConfig


def _train_here(variant: launch.Variant, env: dict) -> subprocess.Popen:
    """A training child's `python -m esft_jax.app.cli ...` as cli.main in this process (the child
    process itself: test_a_child_* below), sharing this process's compiled programs; returns a
    finished stand-in of its process."""
    argv = list(variant.argv)
    assert argv[:3] == [sys.executable, "-m", "esft_jax.app.cli"] and not env, argv
    code = cli.main(argv[3:])
    return _Finished(code)


class _Finished:
    """A child process that has exited with `returncode`."""

    def __init__(self, returncode: int):
        self.returncode = returncode

    def poll(self) -> int:
        return self.returncode


@pytest.mark.slow
def test_run_pipeline_and_rerun_from_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "_start", _train_here)
    c = config_files.load(
        "configs/experiments/builtin.py:math",
        [
            f"checkpoint={fx.base_checkpoint(tmp_path / 'base')}",
            f"run_dir={tmp_path / 'run'}",
            f"suite_dir={tmp_path / 'suite'}",
            "eval.limit=4",
            "eval.batch_size=4",
            "profile.token_budget=500",
            "perplexity_set=''",  # 300 held-out documents per model; tests/test_cli.py covers perplexity
            "train=('steps=2', 'batch_size=2', 'data.seq_len=64', "
            "'log_every=1', 'eval_every=2', 'checkpoint_every=2')",
        ],
    )
    table = experiment.run(c).read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert list(rows) == ["vanilla", "fft", "lora", "esft_token", "esft_gate"]
    assert "(100.0%)" in rows["fft"] and "MB" in rows["esft_token"]
    for name in (
        "routing_heatmap.png",
        "score_vs_params.png",
        "experts_token.json",
        "experts_gate.json",
    ):
        assert (tmp_path / "run" / name).is_file()
    start = time.perf_counter()
    assert experiment.run(c).read_text() == table  # everything cached: nothing recomputed
    assert time.perf_counter() - start < 30


def test_official_study_prints_one_command_per_method(tmp_path, reference, capsys):
    """The official-datasets study on a small model: profile + select run, then the launch commands."""
    c = config_files.load(
        "configs/experiments/official.py:intent",
        [
            f"checkpoint={config_files.load('configs/experiments/builtin.py').checkpoint}",
            f"suite_dir={reference / 'datasets'}",
            f"run_dir={tmp_path}",
            "launch=print",
            "profile.token_budget=1000",
            "profile.seq_len=256",
            "train=('mesh.expert=8',)",
        ],
    )
    assert c.general_tasks == ("law", "summary", "translation") and c.scoring.law.scorer == "chrf"
    experiment.run(c)
    commands = [line for line in capsys.readouterr().out.splitlines() if " train --config " in line]
    assert [cmd.split("configs/train.py:")[1].split()[0] for cmd in commands] == [
        "fft",
        "lora",
        "esft",
        "esft",
    ]
    assert all(
        f"--config.data.train={reference / 'datasets' / 'train' / 'intent.jsonl'}" in cmd
        for cmd in commands
    )
    assert all("--config.mesh.expert=8" in cmd.split() for cmd in commands)
    for name in ("token", "gate"):
        assert ExpertConfig.load(tmp_path / f"experts_{name}.json").experts  # some experts selected
    assert not (tmp_path / "eval_vanilla.json").exists()  # print mode evaluates nothing


def test_main_config_is_every_builtin_task():
    c = config_files.load("configs/experiments/main.py", ["launch=print"])
    assert list(c.studies) == list(builtin_suite.DOWNSTREAM)
    assert {s.launch for s in c.studies.values()} == {"print"}
    assert len({s.run_dir for s in c.studies.values()}) == 3


@pytest.mark.parametrize("spec", ["builtin.py:intent", "official.py:intent"])
def test_training_children_run_the_studys_runtime_model_fields(tmp_path, spec):
    """official.py's model is bfloat16 with scanned layers; configs/train.py's default is not."""
    c = config_files.load(f"configs/experiments/{spec}", ["model.moe_strategy=dense"])
    args = steps.train_command(c, "esft_token", tmp_path, tmp_path)
    at = args.index("--config")
    child = config_files.load(args[at + 1], [a.removeprefix("--config.") for a in args[at + 2 :]])
    assert {k: child.model[k] for k in RUNTIME_FIELDS} == {k: c.model[k] for k in RUNTIME_FIELDS}


def _child(monkeypatch, code: str, method: str, run: Path) -> tuple:
    """(a study config training `method` alone, its variants) with every training child
    `python -c code <workdir>` instead of `esft train`."""
    monkeypatch.setattr(
        experiment,
        "train_command",
        lambda c, method, run, suite: [sys.executable, "-c", code, str(run / f"train_{method}")],
    )
    c = config_files.load("configs/experiments/builtin.py", [f"methods=('{method}',)"])
    return c, experiment._variants(c, run, run)


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) if the test takes over 60 s."""

    def expire(*_):
        raise TimeoutError("the training child and the parent blocked each other")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_child_writing_megabytes_does_not_block_the_study(tmp_path, monkeypatch, deadline):
    """1 MiB of progress bar on stderr, 16 pipe buffers' worth, then the summary: the parent waits it out."""
    c, variants = _child(
        monkeypatch,
        "import json, pathlib, sys\n"
        "for i in range(16384): sys.stderr.write(f'step {i:6d} ' + 51 * '#' + '\\r')\n"
        "print('done')\n"
        "pathlib.Path(sys.argv[1], 'summary.json').write_text(json.dumps({'steps': 2}))",
        "fft",
        tmp_path,
    )
    launch.train(c, variants)
    summary_file = tmp_path / "train_fft" / launch.SUMMARY
    summary = json.loads(summary_file.read_text())
    assert summary["steps"] == 2 and summary["wall_seconds"] > 0
    log = tmp_path / "train_fft" / launch.TRAIN_LOG
    assert log.stat().st_size == 16384 * 64 + len("done\n")
    # cached: no child runs
    launch.train(c, variants)
    assert json.loads(summary_file.read_text()) == summary


def test_a_failed_child_is_one_error_line_and_its_log_tail(tmp_path, monkeypatch, capsys, deadline):
    """`esft run` exits 2 with the log's path and its last lines, not a traceback of the parent."""
    c, variants = _child(
        monkeypatch,
        "import sys\n"
        "for i in range(200): print(f'line {i}', file=sys.stderr)\n"
        "print('ValueError: out of cheese', file=sys.stderr)\n"
        "sys.exit(3)",
        "lora",
        tmp_path,
    )
    monkeypatch.setattr(experiment, "run", lambda c: launch.train(c, variants))
    assert cli.main(["run", "--config", "configs/experiments/builtin.py"]) == 2
    err = capsys.readouterr().err.splitlines()
    log = tmp_path / "train_lora" / launch.TRAIN_LOG
    assert err[0] == f"esft run: error: training lora failed (exit status 3); last lines of {log}:"
    tail = [f"line {i}" for i in range(200 - launch.LOG_TAIL_LINES + 1, 200)] + [
        "ValueError: out of cheese"
    ]
    assert err[1:] == tail
    assert not (tmp_path / "train_lora" / "summary.json").exists()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is Linux's")
@pytest.mark.slow  # a child process
def test_a_child_reports_its_own_peak_memory_not_its_parents():
    """getrusage's ru_maxrss carries a parent's peak across fork + exec; the summary's peak RSS
    (runtime.peak_rss_bytes) is the training process's own."""
    import numpy as np

    parent = np.ones(1_500_000_000 // 8)  # 1.5 GB resident in this process
    code = (
        "import resource, esft_jax.app.runtime as r; "
        "print(r.peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    own, inherited = map(
        int,
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split(),
    )
    # the child itself holds far less than its parent
    assert own < parent.nbytes / 2, (
        own,
        inherited,
    )


def test_a_study_names_a_train_preset_or_a_selected_experts_method_and_its_selection(capsys):
    selections = {"token": None, "gate": None}
    assert experiment.preset_of("esft_token", selections) == ("esft", "token")
    assert experiment.preset_of("fft", selections) == ("fft", None)
    assert experiment.preset_of("router", selections) == ("router", None)
    for wrong in ("esft", "esft_p50", "tokens", "lora_token"):
        assert experiment.preset_of(wrong, selections) is None
    args = ["run", "--config", "configs/experiments/builtin.py", "--config.methods=('esft_p50',)"]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.startswith(
        "esft run: error: --config.methods: 'esft_p50' is neither a preset of configs/train.py "
        "(fft, lora, router"
    )


@pytest.mark.parametrize(
    "spec",
    [
        "builtin.py",
        "main.py",
        "ablations.py:modules",
        "successors.py",
        "small_data.py",
        "sequential.py",
    ],
)
def test_every_shipped_study_passes_its_checks(spec, tmp_path):
    """Each method a shipped study names is a train preset (or <method>_<selection>) that exists."""
    c = config_files.load(f"configs/experiments/{spec}", command="run")
    experiment.check(c)


def test_a_sweep_merges_its_studies_adapters_and_scores_the_merge_on_every_task(tmp_path):
    """main.py's merge: each study's esft_token adapter merged (average), the merged model scored on
    every study's task, beside each task's own adapter."""
    from esft_jax.checkpoint.adapter import read_adapter
    from esft_jax.report import Study

    base = fx.base_checkpoint(tmp_path / "base")
    builtin_suite.write_suite(tmp_path / "suite", n_train=4, n_eval=4, seed=0, n_docs=2)
    sweep = config_files.load("configs/experiments/main.py", command="run")
    prepared, finished = {}, {}
    for task in ("math", "sort"):
        study = sweep.studies[task]
        study.checkpoint, study.suite_dir = str(base), str(tmp_path / "suite")
        study.run_dir, study.eval.limit, study.perplexity_set = str(tmp_path / task), 2, ""
        fx.fake_esft_adapter(base, tmp_path / task / "train_esft_token" / "adapter")
        prepared[task] = experiment._Prepared(
            study, Path(study.run_dir), tmp_path / "suite", None, {}
        )
        own = {task: 0.5, "facts": 0.25, "count": 0.75}
        finished[task] = (None, Study(task, ("facts", "count"), {"esft_token": own}, {}))
    sweep.run_dir = str(tmp_path / "sweep")
    table = experiment._merged(sweep, prepared, finished)
    merged = tmp_path / "sweep" / "merged_esft_token"
    tensors, metadata = read_adapter(merged)
    assert metadata["merge"]["overlap"] == "average" and len(tensors) == 4
    scores = json.loads((tmp_path / "sweep" / "eval_merged_esft_token.json").read_text())
    assert {"math", "sort", "facts", "count"} <= set(scores)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table.splitlines()[2:]}
    assert [c.strip() for c in rows["esft_token: each task's own adapter"]] == [
        "0.500",
        "0.500",
        "0.500",
    ]
    merged_row = [c.strip() for c in rows["esft_token: the 2 merged (average)"]]
    assert merged_row == [f"{scores['math']:.3f}", f"{scores['sort']:.3f}", merged_row[2]]

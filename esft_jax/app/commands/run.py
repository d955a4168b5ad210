"""`esft run`: the whole ESFT study for one task, each step cached in the run directory.

profile -> select experts (one expert config per entry of `c.selections`) -> eval the base model ->
train every method of `c.methods` ("fft", "lora", or "esft_<selection>") -> eval each on the task
and the general tasks (`c.scoring` says how each is scored) -> a markdown table in the spirit of
the paper's Tables 1-2 (+ trainable parameters, optimizer-state bytes, adapter bytes, train time,
peak memory) and plots. Ablations are just more selections (threshold p, score function, random
experts, expert groups, trainable-module flags). A step whose output exists is skipped, so a rerun
only does what is missing. Each training runs in a child process (its peak memory is its own; its
output goes to <workdir>/train.log, whose last lines a failure shows); `c.launch = "print"` stops
after selection and prints those commands, one per method, for a cluster. Profiling, selection and
evaluation are `esft profile` / `select` / `eval`'s own functions (their modules beside this one)
on their config files with the study's model source; each evaluation's predictions go to
<run_dir>/eval_<method>/.

A config with `c.studies` (name -> study config) is a sweep: each study runs in turn (or prints its
commands), then one table of all of them (report.aggregate_table) and a trade-off plot.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from esft_jax import report
from esft_jax.app import config_files
from esft_jax.app.checks import (
    architecture_override,
    one_of,
    required,
    template,
    whole,
    writable_dir,
)
from esft_jax.app.commands import profile as routing_run
from esft_jax.app.commands.eval import check_scoring, evaluate
from esft_jax.app.commands.select import check_selection, select_experts
from esft_jax.app.config_files import ConfigFileError
from esft_jax.app.runtime import RUNTIME_FIELDS
from esft_jax.builtin import suite as builtin_suite
from esft_jax.data.chat import LOSS_ON
from esft_jax.data.sources import EXTENSIONS, FORMATS
from esft_jax.errors import UserError
from esft_jax.routing import analyze
from esft_jax.routing.sources import STATS_FILE, load_stats

# the study's, for each of its steps
STEP_FIELDS = (
    "model",
    "checkpoint",
    "tokenizer",
    "template",
    "seed",
    "mesh",
)


def _cached(path: Path, compute) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=1) + "\n")
    return value


def _step_config(c: ml_collections.ConfigDict, command: str, **fields) -> ml_collections.ConfigDict:
    """configs/<command>.py with the study's model source and `fields` (step config = the command's)."""
    step = config_files.load_file(f"configs/{command}.py")
    for key, value in {**{k: c[k] for k in STEP_FIELDS}, **fields}.items():
        step[key] = value
    return step


def _data(directory: Path, name: str) -> str:
    """The suite's data set `name` in `directory`: the first of <name>.jsonl, .ndjson, .json,
    .parquet, .arrow or a folder <name> that exists (<name>.jsonl, for the error, if none does)."""
    found = [directory / f"{name}{ext}" for ext in EXTENSIONS] + [directory / name]
    return str(next((p for p in found if p.exists()), found[0]))


def _profile(c: ml_collections.ConfigDict, suite: Path, out: Path) -> None:
    """`esft profile` of the task's training data into `out`."""
    routing_run.profile_routing(
        _step_config(
            c,
            "profile",
            data=_data(suite / "train", c.task),
            data_format=c.data_format,
            token_budget=c.profile.token_budget,
            seq_len=c.profile.seq_len,
            batch_size=c.profile.batch_size,
            out_dir=str(out),
            progress=False,
        )
    )


def _evaluate(c: ml_collections.ConfigDict, suite: Path, out: Path, adapter: str = "") -> dict:
    """`esft eval` of the base model (+ adapter) into `out`: task score, general-suite scores and
    held-out perplexity."""
    eval_dir = suite / "eval"
    tasks = ml_collections.ConfigDict(
        {
            name: dict(
                data=_data(eval_dir, name),
                format=c.data_format,
                limit=c.eval.limit,
                **c.scoring[name].to_dict(),
            )
            for name in [c.task, *c.general_tasks]
        }
    )
    held_out = _data(eval_dir, c.perplexity_set) if c.perplexity_set else ""
    perplexity = ml_collections.ConfigDict(
        dict(data=held_out, format=c.data_format, seq_len=c.eval.seq_len, limit=0)
    )
    step = _step_config(
        c,
        "eval",
        adapter=adapter,
        tasks=tasks,
        perplexity=perplexity,
        judge=c.judge,
        batch_size=c.eval.batch_size,
        out_dir=str(out),
    )
    return evaluate(step).scores


def _train_command(c: ml_collections.ConfigDict, method: str, run: Path, suite: Path) -> list[str]:
    kind = "esft" if method.startswith("esft_") else method
    train_config = config_files.resolve("configs/train.py")
    args = [
        sys.executable,
        "-m",
        "esft_jax.app.cli",
        "train",
        "--config",
        f"{train_config}:{kind}",
        f"--config.checkpoint={c.checkpoint}",
        f"--config.data.train={_data(suite / 'train', c.task)}",
        f"--config.workdir={run / f'train_{method}'}",
        f"--config.optim.lr={c.lr.get(method, c.lr.esft)}",
        f"--config.data.template={c.template}",
        f"--config.data.loss_on={c.loss_on}",
        *(f"--config.mesh.{axis}={size}" for axis, size in c.mesh.items() if size != 1),
        # the study's runtime model fields (dtype, strategy, ...), so training runs the model it profiles
        *(f"--config.model.{k}={c.model[k]}" for k in RUNTIME_FIELDS if k in c.model),
        *(f"--config.{override}" for override in c.train),
    ]
    if c.data_format != "auto":
        args.append(f"--config.data.format={c.data_format}")
    if kind == "esft":
        selection = method.removeprefix("esft_")
        args.append(f"--config.expert_config={run / f'experts_{selection}.json'}")
    return args


class ExperimentError(UserError, RuntimeError):
    """A step of the study failed (a training child exited non-zero)."""


TRAIN_LOG = "train.log"  # the training child's stdout and stderr, in its workdir
LOG_TAIL_LINES = 15


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` non-empty lines of a log; progress-bar redraws (carriage returns) split lines."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 64 * 1024))
        text = f.read().decode(errors="replace")
    return "\n".join(
        [line for line in text.replace("\r", "\n").split("\n") if line.strip()][-lines:]
    )


def _train_child(c: ml_collections.ConfigDict, method: str, run: Path, suite: Path) -> dict:
    """`esft train` in a child process (its peak RSS its own); returns its summary plus the wall time.

    The child writes to <workdir>/train.log (appended to across reruns), never to a pipe: a pipe
    nobody reads fills at 64 KiB and blocks the child while the parent waits for it."""
    workdir = run / f"train_{method}"
    if (workdir / "summary.json").is_file():
        return json.loads((workdir / "summary.json").read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / TRAIN_LOG
    start = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.run(
            _train_command(c, method, run, suite), stdout=out, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0 or not (workdir / "summary.json").is_file():
        why = f"exit status {proc.returncode}" if proc.returncode else "no summary.json written"
        raise ExperimentError(
            f"training {method} failed ({why}); last lines of {log}:\n{log_tail(log)}"
        )
    summary = json.loads((workdir / "summary.json").read_text())
    summary.update(wall_seconds=time.perf_counter() - start)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run(c: ml_collections.ConfigDict) -> Path:
    """Run (or finish) the study or the sweep; returns the path of its markdown table."""
    if "studies" not in c:
        return run_study(c)[0]
    run_dir = Path(c.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    studies = {}
    for name, sub in c.studies.items():
        print(f"=== study {name} ===")
        studies[name] = run_study(sub)[1]
    if c.studies and all(s is not None for s in studies.values()):
        table = report.aggregate_table(studies)
        (run_dir / "results.md").write_text(table)
        report.tradeoff_plot(studies, run_dir / "tradeoff.png")
        print("\n" + table + f"\ntable: {run_dir / 'results.md'}; plot: {run_dir / 'tradeoff.png'}")
    return run_dir / "results.md"


def run_study(c: ml_collections.ConfigDict) -> tuple[Path, report.Study | None]:
    """One task: (the path of its table, its results; None when c.launch == "print")."""
    run_dir = Path(c.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    suite = Path(c.suite_dir)
    if c.builtin_suite and not (suite / "eval" / "docs.jsonl").is_file():
        builtin_suite.write_suite(suite, seed=c.seed)
    print(f"[1/5] profiling routing on {c.task}")
    if not (run_dir / "profile" / STATS_FILE).is_file():
        _profile(c, suite, run_dir / "profile")
    stats = load_stats(run_dir / "profile")

    print("[2/5] selecting experts")
    for name, spec in c.selections.items():
        select_experts(stats, spec, c.seed).save(run_dir / f"experts_{name}.json")
    if c.launch == "print":
        for m in c.methods:
            print(" ".join(_train_command(c, m, run_dir, suite)))
        return run_dir / "results.md", None

    print(f"[3/5] vanilla eval of {c.checkpoint}")
    results = {
        "vanilla": _cached(
            run_dir / "eval_vanilla.json", lambda: _evaluate(c, suite, run_dir / "eval_vanilla")
        )
    }

    print(f"[4/5] training {', '.join(c.methods)}")
    summaries = {m: _train_child(c, m, run_dir, suite) for m in c.methods}

    print("[5/5] evaluating the fine-tuned models")
    for m in c.methods:
        adapter = str(run_dir / f"train_{m}" / "adapter")
        results[m] = _cached(
            run_dir / f"eval_{m}.json",
            lambda m=m, adapter=adapter: _evaluate(c, suite, run_dir / f"eval_{m}", adapter),
        )
    study = report.Study(c.task, tuple(c.general_tasks), results, summaries)
    table = report.study_table(study)
    (run_dir / "results.md").write_text(table)
    analyze.heatmap(stats, run_dir / "routing_heatmap.png", c.task)
    report.score_plot(study, run_dir / "score_vs_params.png")
    print(
        "\n"
        + table
        + f"\ntable: {run_dir / 'results.md'}; plots: {run_dir / 'routing_heatmap.png'}, "
        f"{run_dir / 'score_vs_params.png'}"
    )
    return run_dir / "results.md", study


def check_study(c: ml_collections.ConfigDict) -> None:
    required(c, "checkpoint", "the Hugging Face checkpoint the study fine-tunes")
    for name in c.selections:
        check_selection(c, f"selections.{name}.")
    for method in c.methods:
        if method not in ("fft", "lora") and method.removeprefix("esft_") not in c.selections:
            raise ConfigFileError(
                f"--config.methods: {method!r} is neither fft, lora nor esft_<one of "
                f"{', '.join(c.selections)}>"
            )
    for name in [c.task, *c.general_tasks]:
        if name not in c.scoring:
            raise ConfigFileError(f"--config.scoring: no entry for task {name!r}")
        check_scoring(c, f"scoring.{name}", c.judge)
    one_of(c, "launch", ("local", "print"))
    one_of(c, "data_format", FORMATS)
    template(c, "template")
    one_of(c, "loss_on", LOSS_ON)
    for override in c.train:  # each `esft train` of the study trains c.checkpoint
        architecture_override(
            f"--config.train: {override!r}", override.partition("=")[0], c.checkpoint
        )
    for key in (
        "profile.token_budget",
        "profile.seq_len",
        "profile.batch_size",
        "eval.batch_size",
        "eval.seq_len",
    ):
        whole(c, key)
    whole(c, "eval.limit", 0)
    writable_dir(c, "run_dir")


def check(c: ml_collections.ConfigDict) -> None:
    if "studies" not in c:
        return check_study(c)
    writable_dir(c, "run_dir")
    for name, study in c.studies.items():
        try:
            check_study(study)
        except ConfigFileError as e:
            raise ConfigFileError(
                str(e).replace("--config.", f"--config.studies.{name}.", 1)
            ) from None

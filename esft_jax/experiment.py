"""`esft run`: the whole ESFT study for one task, each step cached in the run directory.

profile -> select experts (one expert config per entry of `c.selections`) -> eval the base model ->
train every method of `c.methods` ("fft", "lora", or "esft_<selection>") -> eval each on the task
and the general tasks (`c.scoring` says how each is scored) -> a markdown table in the spirit of
the paper's Tables 1-2 (+ trainable parameters, optimizer-state bytes, adapter bytes, train time,
peak memory) and plots. Ablations are just more selections (threshold p, score function, random
experts, expert groups, trainable-module flags). A step whose output exists is skipped, so a rerun
only does what is missing. Each training runs in a child process (its peak memory is its own; its
output goes to <workdir>/train.log, whose last lines a failure shows); `c.launch = "print"` stops
after selection and prints those commands, one per method, for a cluster.

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

from esft_jax import report, runtime, sharding
from esft_jax.builtin import tasks as builtin_tasks
from esft_jax.data.records import read_jsonl
from esft_jax.eval.judge import judge_from_config
from esft_jax.eval.tasks import evaluate_task, perplexity, read_eval_jsonl
from esft_jax.expert_config import ExpertConfig
from esft_jax.model import param_axes
from esft_jax.routing import analyze, profile, scores, select
from esft_jax.routing.sources import STATS_FILE, load_stats


def selection(score: str = "token", p: float = 0.2, method: str = "threshold", **flags) -> ml_collections.ConfigDict:
    """One expert selection (see esft_jax/routing/select.py) and the expert config's flags."""
    return ml_collections.ConfigDict(dict(
        score=score, norm="pooled", p=p, method=method, group_size=flags.get("group_size", 1),
        grouping=flags.get("grouping", "coactivation"), shared_experts=flags.get("shared_experts", False),
        non_expert_modules=flags.get("non_expert_modules", False), shared_only=flags.get("shared_only", False)))


def scoring(scorer: str, max_new_tokens: int, stop: str = "") -> ml_collections.ConfigDict:
    """How a task is scored: a scorer of esft_jax/eval/scorers.py or "judge"; stop strings split by "|"."""
    return ml_collections.ConfigDict(dict(scorer=scorer, max_new_tokens=max_new_tokens, stop=stop))


def _cached(path: Path, compute) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=1) + "\n")
    return value


def _evaluate(c: ml_collections.ConfigDict, suite: Path, adapter: str = "") -> dict:
    """Task score, general-suite scores and held-out perplexity of the base model (+ adapter)."""
    model = ml_collections.ConfigDict({**c.to_dict(), "adapter": adapter})
    mesh = runtime.mesh(c)
    cfg, params = runtime.load_model(model, mesh)
    if mesh is not None:  # random weights are made on one device
        params = sharding.shard_params(params, param_axes(cfg), mesh)
    tok = runtime.tokenizer(c)
    judge = judge_from_config(c.judge)
    out = {}
    for name in [c.task, *c.general_tasks]:
        spec = c.scoring[name]
        samples = read_eval_jsonl(suite / "eval" / f"{name}.jsonl", c.eval.limit)
        out[name], _ = evaluate_task(params, cfg, tok, samples, scorer=spec.scorer, max_new_tokens=spec.max_new_tokens,
                                     stop=[s for s in spec.stop.split("|") if s], batch_size=c.eval.batch_size,
                                     judge=judge, mesh=mesh)
    if c.perplexity_set:
        held_out, _ = read_jsonl(suite / "eval" / f"{c.perplexity_set}.jsonl")
        out["perplexity"] = perplexity(params, cfg, tok, held_out, seq_len=c.eval.seq_len,
                                       batch_size=c.eval.batch_size, mesh=mesh)
    return out


def _train_command(c: ml_collections.ConfigDict, method: str, run: Path, suite: Path) -> list[str]:
    kind = "esft" if method.startswith("esft_") else method
    args = [sys.executable, "-m", "esft_jax.cli", "train", "--config", f"configs/train.py:{kind}",
            f"--config.checkpoint={c.checkpoint}", f"--config.data.train={suite / 'train' / f'{c.task}.jsonl'}",
            f"--config.workdir={run / f'train_{method}'}", f"--config.optim.lr={c.lr.get(method, c.lr.esft)}",
            *(f"--config.mesh.{axis}={size}" for axis, size in c.mesh.items() if size != 1),
            *(f"--config.{override}" for override in c.train)]
    if kind == "esft":
        selection = method.removeprefix("esft_")
        args.append(f"--config.expert_config={run / f'experts_{selection}.json'}")
    return args


class ExperimentError(RuntimeError):
    """A step of the study failed (a training child exited non-zero)."""


TRAIN_LOG = "train.log"  # the training child's stdout and stderr, in its workdir
LOG_TAIL_LINES = 15


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` non-empty lines of a log; progress-bar redraws (carriage returns) split lines."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 64 * 1024))
        text = f.read().decode(errors="replace")
    return "\n".join([line for line in text.replace("\r", "\n").split("\n") if line.strip()][-lines:])


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
        proc = subprocess.run(_train_command(c, method, run, suite), stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not (workdir / "summary.json").is_file():
        why = f"exit status {proc.returncode}" if proc.returncode else "no summary.json written"
        raise ExperimentError(f"training {method} failed ({why}); last lines of {log}:\n{log_tail(log)}")
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
        builtin_tasks.write_suite(suite, seed=c.seed)
    print(f"[1/5] profiling routing on {c.task}")
    if not (run_dir / "profile" / STATS_FILE).is_file():
        mesh = runtime.mesh(c)
        cfg, params = runtime.load_model(c, mesh)
        samples, _ = read_jsonl(suite / "train" / f"{c.task}.jsonl")
        seqs = profile.sequences(samples, runtime.tokenizer(c), cfg, seq_len=c.profile.seq_len,
                                 token_budget=c.profile.token_budget, seed=c.seed)
        profile.profile(params, cfg, seqs, batch_size=c.profile.batch_size, seq_len=c.profile.seq_len,
                        mesh=mesh, progress=False).save(run_dir / "profile" / STATS_FILE)
    stats = load_stats(run_dir / "profile")

    print("[2/5] selecting experts")
    for name, spec in c.selections.items():
        chosen = select.select(scores.expert_scores(stats, spec.score, spec.norm), spec.method, p=spec.p,
                               seed=c.seed, group_size=spec.group_size, grouping=spec.grouping,
                               coactivation_lee=stats.coactivation)
        if spec.shared_only:
            chosen = [[] for _ in chosen]
        ExpertConfig(dict(zip(stats.layers, chosen)), spec.shared_experts, spec.non_expert_modules).save(
            run_dir / f"experts_{name}.json")
    if c.launch == "print":
        for m in c.methods:
            print(" ".join(_train_command(c, m, run_dir, suite)))
        return run_dir / "results.md", None

    print(f"[3/5] vanilla eval of {c.checkpoint}")
    results = {"vanilla": _cached(run_dir / "eval_vanilla.json", lambda: _evaluate(c, suite))}

    print(f"[4/5] training {', '.join(c.methods)}")
    summaries = {m: _train_child(c, m, run_dir, suite) for m in c.methods}

    print("[5/5] evaluating the fine-tuned models")
    for m in c.methods:
        adapter = str(run_dir / f"train_{m}" / "adapter")
        results[m] = _cached(run_dir / f"eval_{m}.json", lambda adapter=adapter: _evaluate(c, suite, adapter))
    study = report.Study(c.task, tuple(c.general_tasks), results, summaries)
    table = report.study_table(study)
    (run_dir / "results.md").write_text(table)
    analyze.heatmap(stats, run_dir / "routing_heatmap.png", c.task)
    report.score_plot(study, run_dir / "score_vs_params.png")
    print("\n" + table + f"\ntable: {run_dir / 'results.md'}; plots: {run_dir / 'routing_heatmap.png'}, "
          f"{run_dir / 'score_vs_params.png'}")
    return run_dir / "results.md", study

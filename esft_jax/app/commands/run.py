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

import copy
import json
from pathlib import Path
from typing import NamedTuple

import ml_collections

from esft_jax import report
from esft_jax.app import config_files, launch, sequential
from esft_jax.app.checks import (
    architecture_override,
    number,
    one_of,
    required,
    template,
    whole,
    writable_dir,
)
from esft_jax.app.commands.eval import check_scoring
from esft_jax.app.commands.select import check_selection, select_experts
from esft_jax.app.config_files import ConfigFileError
from esft_jax.app.launch import Variant
from esft_jax.app.study_steps import (
    TRAIN_CONFIG,
    cached,
    evaluate_model,
    preset_of,
    profile_task,
    train_command,
)
from esft_jax.builtin import suite as builtin_suite
from esft_jax.checkpoint.adapter import CONFIG_FILE as ADAPTER_CONFIG
from esft_jax.checkpoint.merge import OVERLAP, merge_adapters
from esft_jax.data.chat import LOSS_ON
from esft_jax.data.sources import FORMATS
from esft_jax.expert_config import ExpertConfig
from esft_jax.routing import analyze, drift
from esft_jax.routing.scores import KINDS
from esft_jax.routing.sources import STATS_FILE, load_stats
from esft_jax.routing.stats import RoutingStats
from esft_jax.train.method import SELECTED_EXPERTS


def _variants(c: ml_collections.ConfigDict, run: Path, suite: Path, study: str = "") -> list:
    """The study's training variants, one per method (named study/method in a sweep)."""
    return [
        Variant(
            f"{study}/{m}" if study else m,
            tuple(train_command(c, m, run, suite)),
            run / f"train_{m}",
        )
        for m in c.methods
    ]


class _Prepared(NamedTuple):
    c: ml_collections.ConfigDict
    run_dir: Path
    suite: Path
    stats: RoutingStats
    vanilla: dict


def _prepare(c: ml_collections.ConfigDict) -> _Prepared | None:
    """Steps 1-3 of a study: profile, select, evaluate the base model; None (after printing each
    method's `esft train` command) when c.launch == "print"."""
    run_dir = Path(c.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    suite = Path(c.suite_dir)
    if c.builtin_suite and not (suite / "eval" / "docs.jsonl").is_file():
        builtin_suite.write_suite(suite, seed=c.seed)
    print(f"[1/5] profiling routing on {c.task}")
    if not (run_dir / "profile" / STATS_FILE).is_file():
        profile_task(c, suite, run_dir / "profile")
    stats = load_stats(run_dir / "profile")

    print("[2/5] selecting experts")
    for name, spec in c.selections.items():
        select_experts(stats, spec, c.seed).save(run_dir / f"experts_{name}.json")
    if c.launch == "print":
        for m in c.methods:
            print(" ".join(train_command(c, m, run_dir, suite)))
        return None

    print(f"[3/5] vanilla eval of {c.checkpoint}")
    vanilla = cached(
        run_dir / "eval_vanilla.json", lambda: evaluate_model(c, suite, run_dir / "eval_vanilla")
    )
    return _Prepared(c, run_dir, suite, stats, vanilla)


def _finish(p: _Prepared) -> tuple[Path, report.Study]:
    """Step 5 of a study (its methods trained): evaluate each, write the table and plots."""
    c, run_dir = p.c, p.run_dir
    print("[5/5] evaluating the fine-tuned models")
    results, summaries = {"vanilla": p.vanilla}, {}
    for m in c.methods:
        workdir = run_dir / f"train_{m}"
        summaries[m] = json.loads((workdir / launch.SUMMARY).read_text())
        results[m] = cached(
            run_dir / f"eval_{m}.json",
            lambda m=m, adapter=str(workdir / "adapter"): evaluate_model(
                c, p.suite, run_dir / f"eval_{m}", adapter
            ),
        )
    if c.drift.methods:
        _drift(p)
    study = report.Study(c.task, tuple(c.general_tasks), results, summaries)
    table = report.study_table(study)
    (run_dir / "results.md").write_text(table)
    analyze.heatmap(p.stats, run_dir / "routing_heatmap.png", c.task)
    report.score_plot(study, run_dir / "score_vs_params.png")
    print(
        "\n"
        + table
        + f"\ntable: {run_dir / 'results.md'}; plots: {run_dir / 'routing_heatmap.png'}, "
        f"{run_dir / 'score_vs_params.png'}"
    )
    return run_dir / "results.md", study


def _drift(p: _Prepared) -> None:
    """Routing drift of each of c.drift.methods: the task profiled again by the fine-tuned model,
    against the base model's profile (routing/drift.py); <run_dir>/drift.md and drift.png."""
    c, run_dir = p.c, p.run_dir
    drifts = {}
    for m in c.drift.methods:
        after = run_dir / f"profile_{m}"
        if not (after / STATS_FILE).is_file():
            profile_task(c, p.suite, after, str(run_dir / f"train_{m}" / "adapter"))
        _, selection = preset_of(m, c.selections)
        experts = None
        if selection is not None:  # coverage of the experts it trained
            experts = ExpertConfig.load(run_dir / f"experts_{selection}.json").experts
        drifts[m] = drift.compare(p.stats, load_stats(after), experts, c.drift.score, c.drift.p)
    text = drift.methods_table(drifts)
    (run_dir / "drift.md").write_text(text)
    drift.methods_plot(drifts, run_dir / "drift.png")
    print(f"routing drift after fine-tuning ({c.drift.score} scores, p={c.drift.p}):\n{text}")


def _merged(c: ml_collections.ConfigDict, prepared: dict, finished: dict) -> str:
    """Several domains, one model: a sweep's c.merge.method adapters, one per study, merged into one
    (checkpoint/merge.py, c.merge.overlap) and scored on every study's task; a table against each
    task's own adapter. <run_dir>/merged_<method>/ holds the merged adapter."""
    m, run_dir = c.merge.method, Path(c.run_dir)
    merged = run_dir / f"merged_{m}"
    if not (merged / ADAPTER_CONFIG).is_file():
        adapters = [p.run_dir / f"train_{m}" / "adapter" for p in prepared.values()]
        merge_adapters(adapters, c.merge.overlap, merged)
    first = next(iter(prepared.values()))
    tasks = [p.c.task for p in prepared.values()]
    every = copy.deepcopy(first.c)
    every.general_tasks = (*tasks[1:], *first.c.general_tasks)
    scores = cached(
        run_dir / f"eval_merged_{m}.json",
        lambda: evaluate_model(every, first.suite, run_dir / f"eval_merged_{m}", str(merged)),
    )
    general = first.c.general_tasks
    own = [finished[name][1] for name in prepared]
    rows = [
        [
            f"{m}: each task's own adapter",
            *(f"{s.results[m][s.task]:.3f}" for s in own),
            f"{sum(s.general_avg(m) for s in own) / len(own):.3f}",
        ],
        [
            f"{m}: the {len(tasks)} merged ({c.merge.overlap})",
            *(f"{scores[t]:.3f}" for t in tasks),
            f"{sum(scores[g] for g in general) / len(general):.3f}",
        ],
    ]
    return report.markdown_table(["model", *tasks, "general avg"], rows)


def run(c: ml_collections.ConfigDict) -> Path:
    """Run (or finish) the study or the sweep; returns the path of its markdown table. A sweep's
    studies are prepared one after another, then all their variants train together."""
    if "sequence" in c:
        return sequential.run_sequence(c)
    studies = dict(c.studies) if "studies" in c else {"": c}
    prepared = {}
    for name, study in studies.items():
        if name:
            print(f"=== study {name} ===")
        prepared[name] = _prepare(study)
    if c.launch == "print":
        return Path(c.run_dir) / "results.md"
    variants = [v for name, p in prepared.items() for v in _variants(p.c, p.run_dir, p.suite, name)]
    print(f"[4/5] training {', '.join(v.name for v in variants)}")
    launch.train(c, variants)
    finished = {name: _finish(p) for name, p in prepared.items()}
    if "studies" not in c:
        return finished[""][0]
    run_dir = Path(c.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    table = report.aggregate_table({name: study for name, (_, study) in finished.items()})
    if c.get("merge") and c.merge.method:
        table += "\n" + _merged(c, prepared, finished)
    (run_dir / "results.md").write_text(table)
    report.tradeoff_plot(
        {name: study for name, (_, study) in finished.items()}, run_dir / "tradeoff.png"
    )
    print("\n" + table + f"\ntable: {run_dir / 'results.md'}; plot: {run_dir / 'tradeoff.png'}")
    return run_dir / "results.md"


def check_study(c: ml_collections.ConfigDict) -> None:
    required(c, "checkpoint", "the Hugging Face checkpoint the study fine-tunes")
    for name in c.selections:
        check_selection(c, f"selections.{name}.")
    for method in c.methods:
        if preset_of(method, c.selections) is None:
            others = [p for p in config_files.presets(TRAIN_CONFIG) if p not in SELECTED_EXPERTS]
            raise ConfigFileError(
                f"--config.methods: {method!r} is neither a preset of {TRAIN_CONFIG} "
                f"({', '.join(others)}) nor <{'|'.join(SELECTED_EXPERTS)}>_<one of "
                f"{', '.join(c.selections)}>"
            )
    for name in [c.task, *c.general_tasks]:
        if name not in c.scoring:
            raise ConfigFileError(f"--config.scoring: no entry for task {name!r}")
        check_scoring(c, f"scoring.{name}", c.judge)
    one_of(c, "data_format", FORMATS)
    template(c, "template")
    one_of(c, "loss_on", LOSS_ON)
    for override in c.train:  # each `esft train` of the study trains c.checkpoint
        architecture_override(
            f"--config.train: {override!r}", override.partition("=")[0], c.checkpoint
        )
    for m in c.drift.methods:
        if m not in c.methods:
            raise ConfigFileError(f"--config.drift.methods: {m!r} is not one of --config.methods")
    one_of(c, "drift.score", KINDS)
    number(c, "drift.p", 0.0, 1.0, low_open=True)
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
    one_of(c, "launch", launch.LAUNCHES)
    whole(c, "variant_devices", 0)
    if c.launch == "slurm":
        one_of(c, "slurm.cluster", ("slurm", "local", "debug"))
    if "sequence" in c:
        sequential.check(c)
    if "studies" not in c:
        return check_study(c)
    writable_dir(c, "run_dir")
    if c.get("merge") and c.merge.method:
        one_of(c, "merge.overlap", OVERLAP)
        for name, study in c.studies.items():
            if (preset_of(c.merge.method, study.selections) or ("",))[0] != "esft":
                raise ConfigFileError(
                    f"--config.merge.method={c.merge.method!r}: not an ESFT method of study "
                    f"{name} (esft_<one of {', '.join(study.selections)}>)"
                )
            if c.merge.method not in study.methods:
                raise ConfigFileError(
                    f"--config.merge.method={c.merge.method!r}: study {name} does not train it"
                )
    for name, study in c.studies.items():
        try:
            check_study(study)
        except ConfigFileError as e:
            raise ConfigFileError(
                str(e).replace("--config.", f"--config.studies.{name}.", 1)
            ) from None

"""Sequential multi-domain ESFT with progressive freezing (DES-MoE, arXiv 2509.16882): one model
fine-tuned on several tasks in turn, each task's experts frozen for the tasks after it.

For each task of `c.sequence`, in order, on the model the previous tasks left (the study's
checkpoint first): profile its routing, select its experts (`c.selection`), drop the experts an
earlier task trained (frozen), train ESFT on the rest, and merge the adapter into a full checkpoint
(<run_dir>/<k>_<task>/merged), the next task's base. After every task the merged model is evaluated
on every task of the sequence and the general suite: the table's rows are the stages, and the
forgetting of a task is its score right after its own stage less its score at the end.
"""

from __future__ import annotations

import copy
from pathlib import Path

import ml_collections

from esft_jax import report
from esft_jax.app import launch
from esft_jax.app.commands.select import check_selection, select_experts
from esft_jax.app.config_files import ConfigFileError
from esft_jax.app.study_steps import cached, evaluate_model, profile_task, train_command
from esft_jax.builtin import suite as builtin_suite
from esft_jax.checkpoint import save_checkpoint
from esft_jax.checkpoint.adapter import load_with_adapter
from esft_jax.expert_config import ExpertConfig
from esft_jax.routing.expected import expected_coverage
from esft_jax.routing.sources import STATS_FILE, load_stats
from esft_jax.routing.stats import RoutingStats

SELECTION = "sequence"  # the expert config's name in each stage's directory


def unfrozen(selected: ExpertConfig, frozen: dict[int, set[int]], stats: RoutingStats):
    """`selected` without the `frozen` experts (layer -> ids an earlier task trained), its routing
    profile recomputed for what is left."""
    experts = {
        layer: [e for e in ids if e not in frozen.get(layer, set())]
        for layer, ids in selected.experts.items()
    }
    return ExpertConfig(
        experts,
        selected.shared_experts,
        selected.non_expert_modules,
        profile=expected_coverage(stats, experts),
    )


def _stage(c: ml_collections.ConfigDict, k: int, task: str, base: str) -> ml_collections.ConfigDict:
    stage = copy.deepcopy(c)
    stage.task, stage.checkpoint = task, base
    stage.run_dir = str(Path(c.run_dir) / f"{k + 1}_{task}")
    stage.selections = ml_collections.ConfigDict({SELECTION: c.selection})
    return stage


def _merged(base: str, adapter: Path, out: Path) -> str:
    """base + adapter as a full checkpoint in `out` (kept if already written)."""
    if not (out / "config.json").is_file():
        cfg, params = load_with_adapter(base, adapter)
        save_checkpoint(out, cfg, params, tokenizer_from=base, inputs=(base, str(adapter)))
    return str(out)


def run_sequence(c: ml_collections.ConfigDict) -> Path:
    """Train c.sequence's tasks in turn (module docstring); the path of the table."""
    run_dir, suite = Path(c.run_dir), Path(c.suite_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if c.builtin_suite and not (suite / "eval" / "docs.jsonl").is_file():
        builtin_suite.write_suite(suite, seed=c.seed)
    base, frozen, scores = c.checkpoint, {}, {}
    scores["base"] = cached(
        run_dir / "eval_base.json", lambda: _scores(c, suite, run_dir / "eval_base")
    )
    for k, task in enumerate(c.sequence):
        stage = _stage(c, k, task, base)
        stage_dir = Path(stage.run_dir)
        print(f"[{k + 1}/{len(c.sequence)}] {task}: profile, select, train, merge, evaluate")
        if not (stage_dir / "profile" / STATS_FILE).is_file():
            profile_task(stage, suite, stage_dir / "profile")
        stats = load_stats(stage_dir / "profile")
        chosen = unfrozen(select_experts(stats, c.selection, c.seed), frozen, stats)
        chosen.save(stage_dir / f"experts_{SELECTION}.json")
        method = f"esft_{SELECTION}"
        workdir = stage_dir / f"train_{method}"
        variant = launch.Variant(
            task, tuple(train_command(stage, method, stage_dir, suite)), workdir
        )
        launch.train(c, [variant])
        for layer, ids in chosen.experts.items():
            frozen.setdefault(layer, set()).update(ids)
        base = _merged(base, workdir / "adapter", stage_dir / "merged")
        stage.checkpoint = base
        scores[task] = cached(
            stage_dir / "eval.json",
            lambda stage=stage, out=stage_dir / "eval": _scores(stage, suite, out),
        )
    table = report.forgetting_table(tuple(c.sequence), tuple(c.general_tasks), scores)
    (run_dir / "results.md").write_text(table)
    print("\n" + table + f"\ntable: {run_dir / 'results.md'}")
    return run_dir / "results.md"


def check(c: ml_collections.ConfigDict) -> None:
    if len(c.sequence) < 2:
        raise ConfigFileError(f"--config.sequence={tuple(c.sequence)}: name two tasks or more")
    for task in c.sequence:
        if task not in c.scoring:
            raise ConfigFileError(f"--config.sequence: no --config.scoring entry for {task!r}")
    check_selection(c, "selection.")


def _scores(c: ml_collections.ConfigDict, suite: Path, out: Path) -> dict:
    """Every task of the sequence and the general suite, on c's checkpoint."""
    every = copy.deepcopy(c)
    every.general_tasks = tuple(t for t in (*c.sequence, *c.general_tasks) if t != c.task)
    return evaluate_model(every, suite, out)

"""`esft analyze`: routing concentration per task, overlap across tasks, and routing drift from
before to after fine-tuning."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from esft_jax.app.checks import input_path, number, one_of, writable_dir
from esft_jax.app.config_files import ConfigFileError
from esft_jax.expert_config import ExpertConfig
from esft_jax.routing import analyze, drift, scores
from esft_jax.routing.sources import load_stats


def check(c: ml_collections.ConfigDict) -> None:
    if not c.tasks and not (c.drift.before or c.drift.after):
        raise ConfigFileError(
            "--config.tasks: name at least one task (name=stats_dir), or --config.drift.before "
            "and --config.drift.after"
        )
    for name in c.tasks:
        input_path(c, f"tasks.{name}", f"task {name}'s routing statistics")
    number(c, "p", 0.0, 1.0, low_open=True)
    if c.drift.before or c.drift.after:
        input_path(c, "drift.before", "the routing statistics before fine-tuning (esft profile)")
        input_path(
            c, "drift.after", "the routing statistics after (esft profile --config.adapter=...)"
        )
        if c.drift.experts:
            input_path(c, "drift.experts", "the adapter's expert config")
        one_of(c, "drift.score", scores.KINDS)
        one_of(c, "drift.norm", scores.NORMS)
        number(c, "drift.p", 0.0, 1.0, low_open=True)
    writable_dir(c, "out_dir")


def run(c: ml_collections.ConfigDict) -> None:
    """Routing concentration per task and overlap across tasks (a markdown report and heatmaps);
    with drift.before / drift.after, the drift between them (drift.md and drift.png)."""
    tasks = {name: load_stats(path, c.top_k, c.num_experts) for name, path in c.tasks.items()}
    measured = routing_drift(c) if c.drift.before else None  # read all before writing anything
    out = Path(c.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tasks:
        text = analyze.report(tasks, c.p)
        (out / "routing.md").write_text(text)
        for name, stats in tasks.items():
            analyze.heatmap(stats, out / f"heatmap_{name}.png", name)
        print(text + f"\n-> {out / 'routing.md'} and heatmap_<task>.png")
    if measured is not None:
        text = drift.table(measured)
        (out / "drift.md").write_text(text)
        drift.plot(measured, out / "drift.png")
        print(text + f"\n-> {out / 'drift.md'} and {out / 'drift.png'}")


def routing_drift(c: ml_collections.ConfigDict) -> drift.Drift:
    """The drift c.drift names (configs/analyze.py), a mismatch of the two statistics named by key."""
    before = load_stats(c.drift.before, c.top_k, c.num_experts)
    after = load_stats(c.drift.after, c.top_k, c.num_experts)
    experts = (
        ExpertConfig.load(c.drift.experts, before.layers, before.num_experts).experts
        if c.drift.experts
        else None
    )
    try:
        return drift.compare(before, after, experts, c.drift.score, c.drift.p, c.drift.norm)
    except drift.StatsMismatch as e:
        raise ConfigFileError(f"--config.drift.after={c.drift.after}: {e}") from None

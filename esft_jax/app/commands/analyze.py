"""`esft analyze`: routing concentration per task and overlap across tasks."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from esft_jax.app.checks import input_path, number, writable_dir
from esft_jax.app.config_files import ConfigFileError
from esft_jax.routing import analyze
from esft_jax.routing.sources import load_stats


def check(c: ml_collections.ConfigDict) -> None:
    if not c.tasks:
        raise ConfigFileError("--config.tasks: name at least one task (name=stats_dir)")
    for name in c.tasks:
        input_path(c, f"tasks.{name}", f"task {name}'s routing statistics")
    number(c, "p", 0.0, 1.0, low_open=True)
    writable_dir(c, "out_dir")


def run(c: ml_collections.ConfigDict) -> None:
    """Routing concentration per task and overlap across tasks; a markdown report and heatmaps."""
    tasks = {name: load_stats(path, c.top_k, c.num_experts) for name, path in c.tasks.items()}
    out = Path(c.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = analyze.report(tasks, c.p)
    (out / "routing.md").write_text(text)
    for name, stats in tasks.items():
        analyze.heatmap(stats, out / f"heatmap_{name}.png", name)
    print(text + f"\n-> {out / 'routing.md'} and heatmap_<task>.png")

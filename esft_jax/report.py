"""Markdown tables and plots of ESFT studies: one study (a task, every method), and several studies
side by side (the paper's Tables 1-2: task scores per task, general ability averaged).

A study's results are {method: {metric: value}} (metrics: the task's name, each general task's name,
optionally "perplexity"), its summaries {method: esft train's summary.json (+ wall_seconds)}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple


class Study(NamedTuple):
    task: str
    general_tasks: tuple[str, ...]
    results: dict[str, dict[str, float]]  # method ("vanilla" first) -> metric -> value
    summaries: dict[str, dict]  # trained method -> summary

    def general_avg(self, method: str) -> float:
        return sum(self.results[method][g] for g in self.general_tasks) / len(self.general_tasks)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(
    head: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None
) -> str:
    """A GitHub markdown table; `right[i]` right-aligns column i (numbers)."""
    rule = "".join("|---:" if r else "|---" for r in (right or [False] * len(head))) + "|"
    return "\n".join([_row(head), rule, *map(_row, rows)]) + "\n"


def _params_cell(study: Study, method: str) -> str:
    params = study.summaries.get(method, {}).get("trainable_params")
    fft = study.summaries.get("fft", {}).get("trainable_params")
    if not params:
        return "-"
    return f"{params:,}" + (f" ({params / fft:.1%})" if fft else "")


def study_table(study: Study) -> str:
    """One row per method: task score, general scores and average, perplexity, costs (step s: the
    median seconds of a step after compilation), and the general average retained (of vanilla's)."""
    has_ppl = "perplexity" in study.results["vanilla"]
    head = [
        "method",
        study.task,
        *study.general_tasks,
        "general avg",
        *(["held-out ppl"] * has_ppl),
        "trainable params",
        "optimizer state",
        "adapter",
        "train s",
        "step s",
        "peak RSS",
        "general retained",
    ]
    rows = []
    for name, r in study.results.items():
        s = study.summaries.get(name, {})
        cells = [
            name,
            f"{r[study.task]:.3f}",
            *(f"{r[g]:.3f}" for g in study.general_tasks),
            f"{study.general_avg(name):.3f}",
            *([f"{r['perplexity']:.2f}"] if has_ppl else []),
            _params_cell(study, name),
            f"{s['optimizer_state_bytes'] / 1e6:.2f} MB" if s else "-",
            f"{s['adapter_bytes'] / 1e6:.2f} MB" if s else "-",
            f"{s['train_seconds']:.0f}" if s else "-",
            f"{s['step_seconds']:.3f}" if s.get("step_seconds") else "-",
            f"{s['peak_rss_mb']:.0f} MB" if s.get("peak_rss_mb") else "-",
            f"{study.general_avg(name) / study.general_avg('vanilla'):.1%}"
            if study.general_avg("vanilla")
            else "-",
        ]
        rows.append(cells)
    return markdown_table(head, rows)


def forgetting_table(
    sequence: Sequence[str], general: Sequence[str], scores: Mapping[str, Mapping[str, float]]
) -> str:
    """Sequential training: one row per stage (`scores["base"]`, then each task of `sequence` once
    trained: task -> metric -> value), its score on every task and the general average; then each
    task's forgetting, its score right after its own stage less its score after the last."""
    head = ["after", *sequence, "general avg"]
    rows = [
        [
            "base" if stage == "base" else f"{i}. {stage}",
            *(f"{scores[stage][t]:.3f}" for t in sequence),
            f"{sum(scores[stage][g] for g in general) / len(general):.3f}" if general else "-",
        ]
        for i, stage in enumerate(["base", *sequence])
    ]
    last = scores[sequence[-1]]
    rows.append(["forgetting", *(f"{scores[t][t] - last[t]:+.3f}" for t in sequence), ""])
    return markdown_table(head, rows, right=[False] + [True] * (len(head) - 1))


def aggregate_table(studies: Mapping[str, Study]) -> str:
    """Methods x tasks: each study's task score, the mean of them, the mean general average, and the
    mean share of FFT's trainable parameters. Methods missing from a study are left blank."""
    methods = list(dict.fromkeys(m for s in studies.values() for m in s.results))
    head = ["method", *studies, "task avg", "general avg", "trainable (of FFT)"]
    rows = []
    for m in methods:
        runs = [s for s in studies.values() if m in s.results]
        task = [s.results[m][s.task] for s in runs]
        shares = [
            s.summaries[m]["trainable_params"] / s.summaries["fft"]["trainable_params"]
            for s in runs
            if m in s.summaries and "fft" in s.summaries
        ]
        cells = [
            m,
            *(f"{s.results[m][s.task]:.3f}" if m in s.results else "" for s in studies.values()),
            f"{sum(task) / len(task):.3f}",
            f"{sum(s.general_avg(m) for s in runs) / len(runs):.3f}",
            f"{sum(shares) / len(shares):.1%}" if shares else "-",
        ]
        rows.append(cells)
    return markdown_table(head, rows)


def axes(figsize: tuple[float, float] = (5, 3.5)):
    """(figure, axes) of one plot, drawn off screen (Agg): the plots here and routing/'s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out `fig`, write it as a PNG at `path` (its directory created) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def score_plot(study: Study, path: Path) -> None:
    """Task score vs trainable parameters, one point per trained method; vanilla as a line."""
    fig, ax = axes()
    for m, s in study.summaries.items():
        ax.scatter(s["trainable_params"], study.results[m][study.task], label=m)
    ax.axhline(study.results["vanilla"][study.task], color="grey", linestyle="--", label="vanilla")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{study.task} score")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def tradeoff_plot(studies: Mapping[str, Study], path: Path) -> None:
    """General ability vs task score, one point per (method, study): up-right is better."""
    fig, ax = axes()
    methods = list(dict.fromkeys(m for s in studies.values() for m in s.results))
    for i, m in enumerate(methods):
        runs = [s for s in studies.values() if m in s.results]
        ax.scatter(
            [s.results[m][s.task] for s in runs],
            [s.general_avg(m) for s in runs],
            label=m,
            color=f"C{i}",
        )
    ax.set_xlabel("task score")
    ax.set_ylabel("general ability (avg)")
    ax.legend(fontsize=7)
    save_figure(fig, path)

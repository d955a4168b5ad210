"""The observation ESFT rests on, measured: a task's routing is concentrated on few experts, and
different tasks concentrate on different experts.

Per task and layer: the share of routing mass (Token Selection Ratio) held by the top-k experts
(uniform routing would give k/E) and how many experts reach a cumulative share p. Across tasks: per
layer, the Jaccard overlap of the selected sets at p, and the overlap of the routing distributions
(sum over experts of the smaller share; 1 = identical, k/E-ish for unrelated).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from esft_jax.report import axes, markdown_table, save_figure
from esft_jax.routing.scores import expert_scores
from esft_jax.routing.select import by_threshold
from esft_jax.routing.stats import RoutingStats


def top_share(scores_le: np.ndarray, n: int) -> np.ndarray:
    """[L]: the summed score of each layer's n best experts."""
    return np.sort(scores_le, axis=1)[:, ::-1][:, :n].sum(1)


def experts_to_reach(scores_le: np.ndarray, p: float) -> np.ndarray:
    return np.array([len(ids) for ids in by_threshold(scores_le, p)])


def jaccard(a: list[list[int]], b: list[list[int]]) -> np.ndarray:
    return np.array([len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(a, b)])


def distribution_overlap(scores_a: np.ndarray, scores_b: np.ndarray) -> np.ndarray:
    """[L]: sum_e min(a_e, b_e) of the per-layer normalised distributions."""
    a = scores_a / scores_a.sum(1, keepdims=True)
    b = scores_b / scores_b.sum(1, keepdims=True)
    return np.minimum(a, b).sum(1)


def report(tasks: dict[str, RoutingStats], p: float = 0.2) -> str:
    """Markdown tables: concentration per task and layer, then overlap between every pair of tasks."""
    scores = {name: expert_scores(s, "token", "pooled") for name, s in tasks.items()}
    first = next(iter(tasks.values()))
    k, e = first.top_k, first.num_experts
    text = (
        f"## Concentration (Token Selection Ratio; uniform routing: top-{k} share {k / e:.3f}, "
        f"{int(np.ceil(p * e))} experts to reach p={p})\n\n"
        + _concentration(scores, first.layers, k, p)
    )
    if len(scores) > 1:
        text += (
            f"\n## Overlap between tasks (experts selected at p={p}; routing distributions)\n\n"
            + _overlap(scores, p)
        )
    return text


def _concentration(scores: dict[str, np.ndarray], layers: list[int], k: int, p: float) -> str:
    """Per layer (and the mean), each task's top-k share and experts to reach p."""
    head = [
        "layer",
        *(f"{n}: {col}" for n in scores for col in (f"top-{k} share", f"experts to p={p}")),
    ]
    shares = {n: top_share(s, k) for n, s in scores.items()}
    reach = {n: experts_to_reach(s, p) for n, s in scores.items()}
    rows = [
        [str(layer), *(cell for n in scores for cell in (f"{shares[n][i]:.3f}", str(reach[n][i])))]
        for i, layer in enumerate(layers)
    ]
    means = (cell for n in scores for cell in (f"{shares[n].mean():.3f}", f"{reach[n].mean():.1f}"))
    rows.append(["mean", *means])
    return markdown_table(head, rows, right=[True] * len(head))


def _overlap(scores: dict[str, np.ndarray], p: float) -> str:
    """Per pair of tasks, the Jaccard overlap of their selected sets (over layers) and of their routing."""
    rows = []
    for a, b in itertools.combinations(scores, 2):
        jac = jaccard(by_threshold(scores[a], p), by_threshold(scores[b], p))
        ov = distribution_overlap(scores[a], scores[b])
        rows.append(
            [f"{a} / {b}", *(f"{v:.3f}" for v in (jac.mean(), jac.min(), jac.max(), ov.mean()))]
        )
    head = ["tasks", "mean Jaccard of selected sets", "min", "max", "mean distribution overlap"]
    return markdown_table(head, rows, right=[False] + [True] * 4)


def heatmap(stats: RoutingStats, path: str | Path, title: str) -> Path:
    """PNG: layers x experts, colour = Token Selection Ratio."""
    scores = expert_scores(stats, "token", "pooled")
    fig, ax = axes((max(6.0, stats.num_experts / 6), max(3.0, len(stats.layers) / 4)))
    im = ax.imshow(scores, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(stats.layers)), [str(layer) for layer in stats.layers], fontsize=6)
    ax.set_title(f"{title}: Token Selection Ratio ({stats.tokens} tokens)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return save_figure(fig, path)

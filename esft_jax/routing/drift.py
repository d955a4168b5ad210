"""Routing drift: how fine-tuning moved a task's routing, from the task profiled through the base
model (before) and through the fine-tuned one (after): does the adapter still get the tokens its
experts were chosen for?

Per MoE layer, all float64:
- overlap of the selected sets: one rule (routing/scores.py scores, select.by_threshold at p) on
  both profiles, A from before, B from after; Jaccard |A ∩ B| / |A ∪ B| and kept |A ∩ B| / |A|.
- Jensen-Shannon distance of the token-selection distributions (counts over the layer's experts,
  normalised to sum 1), base 2, so it lies in [0, 1]: 0 for identical routing, 1 for disjoint
  experts. Zero entries follow the limit 0 log 0 = 0: an expert no token chose on either side adds
  nothing, one chosen on one side only adds that side's term (m_e > 0 wherever p_e or q_e is).
- coverage (routing/expected.py, what `esft serve` reports): the share of the routed gate mass that
  lands on the adapter's experts, on each profile; its change is after - before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from esft_jax.errors import UserError
from esft_jax.report import axes, markdown_table, save_figure
from esft_jax.routing.analyze import jaccard
from esft_jax.routing.expected import expected_coverage
from esft_jax.routing.scores import expert_scores
from esft_jax.routing.select import by_threshold
from esft_jax.routing.stats import RoutingStats


class StatsMismatch(UserError, ValueError):
    """Before and after statistics of different models (layers, experts or top-k differ)."""


@dataclasses.dataclass(frozen=True)
class Drift:
    """Per-layer drift (row i is model layer layers[i]) and what it was measured with."""

    layers: list[int]
    score: str  # routing/scores.py kind of the selection rule
    norm: str
    p: float
    experts: dict[int, list[int]]  # the adapter's experts (coverage): given, or before's selection
    selected_before: list[list[int]]  # A per layer
    selected_after: list[list[int]]  # B per layer
    jaccard_l: np.ndarray  # |A ∩ B| / |A ∪ B|
    kept_l: np.ndarray  # |A ∩ B| / |A|
    js_distance_l: np.ndarray  # of the token-selection distributions, base 2, in [0, 1]
    coverage_before_l: np.ndarray  # share of the gate mass on `experts`
    coverage_after_l: np.ndarray
    coverage_before: float  # over all layers (sum of hits / sum of mass), as serve's total
    coverage_after: float
    tokens_before: int
    tokens_after: int


def js_distance(p_le: np.ndarray, q_le: np.ndarray) -> np.ndarray:
    """[L]: base-2 Jensen-Shannon distance (the square root of the divergence) between the rows of
    two [L, E] non-negative arrays, each row normalised to sum 1; 0 log 0 = 0 (module docstring)."""
    p_le, q_le = _distribution(p_le), _distribution(q_le)
    m_le = (p_le + q_le) / 2

    def kl_to_m(a_le: np.ndarray) -> np.ndarray:  # a > 0 implies m > 0: no 0/0, no log 0
        ratio = np.divide(a_le, m_le, out=np.ones_like(a_le), where=a_le > 0)
        return (a_le * np.log2(ratio)).sum(axis=1)

    divergence_l = (kl_to_m(p_le) + kl_to_m(q_le)) / 2
    return np.sqrt(np.clip(divergence_l, 0.0, 1.0))  # rounding can leave it a hair outside


def _distribution(x_le: np.ndarray) -> np.ndarray:
    x_le = np.asarray(x_le, np.float64)
    total_l = x_le.sum(axis=1, keepdims=True)
    if (x_le < 0).any() or (total_l <= 0).any():
        raise ValueError("a distribution needs non-negative entries and a positive sum per row")
    return x_le / total_l


def kept(a: list[list[int]], b: list[list[int]]) -> np.ndarray:
    """[L]: the share of each layer's set in `a` that is also in `b`."""
    return np.array([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)])


def compare(
    before: RoutingStats,
    after: RoutingStats,
    experts: Mapping[int, Sequence[int]] | None = None,
    score: str = "token",
    p: float = 0.2,
    norm: str = "pooled",
) -> Drift:
    """The drift from `before` to `after` (one task, profiled without and with the fine-tuning);
    coverage of `experts` (model layer -> expert ids: the adapter's expert config), or of the
    experts the rule selects on `before` when None (what ESFT would train)."""
    _check_same_model(before, after)
    selected_before = by_threshold(expert_scores(before, score, norm), p)
    selected_after = by_threshold(expert_scores(after, score, norm), p)
    chosen = (
        {layer: list(ids) for layer, ids in experts.items()}
        if experts is not None
        else dict(zip(before.layers, selected_before))
    )
    cov_before, cov_after = expected_coverage(before, chosen), expected_coverage(after, chosen)
    return Drift(
        layers=list(before.layers),
        score=score,
        norm=norm,
        p=p,
        experts=chosen,
        selected_before=selected_before,
        selected_after=selected_after,
        jaccard_l=jaccard(selected_before, selected_after),
        kept_l=kept(selected_before, selected_after),
        js_distance_l=js_distance(before.counts, after.counts),
        coverage_before_l=np.array(cov_before["per_layer"]),
        coverage_after_l=np.array(cov_after["per_layer"]),
        coverage_before=cov_before["total"],
        coverage_after=cov_after["total"],
        tokens_before=before.tokens,
        tokens_after=after.tokens,
    )


def _check_same_model(before: RoutingStats, after: RoutingStats) -> None:
    for what in ("layers", "num_experts", "top_k"):
        a, b = getattr(before, what), getattr(after, what)
        if a != b:
            raise StatsMismatch(
                f"{what} is {b} here but {a} in the before statistics (another model?)"
            )


def table(drift: Drift) -> str:
    """Markdown: a line saying how it was measured, then one row per layer and one for all layers
    (overlap and distance: their mean over layers; coverage: the total, as `esft serve` reports)."""
    head = [
        "layer",
        "selected before",
        "selected after",
        "Jaccard",
        "kept",
        "JS distance",
        "coverage before",
        "coverage after",
        "coverage change",
    ]
    rows = [
        [
            str(layer),
            str(len(drift.selected_before[i])),
            str(len(drift.selected_after[i])),
            *_cells(
                drift.jaccard_l[i],
                drift.kept_l[i],
                drift.js_distance_l[i],
                drift.coverage_before_l[i],
                drift.coverage_after_l[i],
            ),
        ]
        for i, layer in enumerate(drift.layers)
    ]
    rows.append(
        [
            "all",
            str(sum(map(len, drift.selected_before))),
            str(sum(map(len, drift.selected_after))),
            *_cells(
                drift.jaccard_l.mean(),
                drift.kept_l.mean(),
                drift.js_distance_l.mean(),
                drift.coverage_before,
                drift.coverage_after,
            ),
        ]
    )
    n = sum(map(len, drift.experts.values()))
    caption = (
        f"Routing drift: experts selected by {drift.score} scores ({drift.norm}) at "
        f"p={drift.p}; coverage of {n} adapter experts; {drift.tokens_before} tokens before, "
        f"{drift.tokens_after} after.\n\n"
    )
    return caption + markdown_table(head, rows, right=[True] * len(head))


def _cells(jac: float, share: float, js: float, cov_before: float, cov_after: float) -> list[str]:
    change = cov_after - cov_before
    return [f"{v:.3f}" for v in (jac, share, js, cov_before, cov_after)] + [f"{change:+.3f}"]


def plot(drift: Drift, path: str | Path) -> Path:
    """PNG: per layer, the JS distance, both overlaps and the coverage before and after (all in
    [0, 1], one axis)."""
    fig, ax = axes((max(5.0, len(drift.layers) / 3), 3.5))
    x = np.arange(len(drift.layers))
    for values, label, style in (
        (drift.js_distance_l, "JS distance", "o-"),
        (drift.jaccard_l, "Jaccard of selected sets", "s-"),
        (drift.kept_l, "kept share of selected", "^-"),
        (drift.coverage_before_l, "coverage before", "x--"),
        (drift.coverage_after_l, "coverage after", "+--"),
    ):
        ax.plot(x, values, style, label=label, markersize=4)
    ax.set_xticks(x, [str(layer) for layer in drift.layers], fontsize=6)
    ax.set_xlabel("layer")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Routing drift ({drift.score} scores, p={drift.p})")
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def methods_table(drifts: Mapping[str, Drift]) -> str:
    """Markdown: one row per fine-tuning method, its drift over all layers (as `table`'s last row)."""
    head = ["method", "Jaccard", "kept", "JS distance", "coverage before", "coverage after"]
    head.append("coverage change")
    rows = [
        [
            name,
            *_cells(
                d.jaccard_l.mean(),
                d.kept_l.mean(),
                d.js_distance_l.mean(),
                d.coverage_before,
                d.coverage_after,
            ),
        ]
        for name, d in drifts.items()
    ]
    return markdown_table(head, rows, right=[False] + [True] * (len(head) - 1))


def methods_plot(drifts: Mapping[str, Drift], path: str | Path) -> Path:
    """PNG: each method's JS distance per layer, one line each."""
    first = next(iter(drifts.values()))
    fig, ax = axes((max(5.0, len(first.layers) / 3), 3.5))
    x = np.arange(len(first.layers))
    for name, d in drifts.items():
        ax.plot(x, d.js_distance_l, "o-", label=name, markersize=4)
    ax.set_xticks(x, [str(layer) for layer in first.layers], fontsize=6)
    ax.set_xlabel("layer")
    ax.set_ylabel("JS distance, before vs after")
    ax.set_title("Routing drift by fine-tuning method")
    ax.legend(fontsize=6)
    return save_figure(fig, path)

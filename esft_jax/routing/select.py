"""Choosing experts per layer from their scores ([L, E] arrays; returns a list of id lists per layer).

- `by_threshold`: descending score (ties: lower id first) until the cumulative score reaches p.
- `top_n`: the n best of each layer.
- `random_like`: random experts, the same number per layer as a reference selection (seeded): the
  paper's random-expert ablation.
- `group_experts` + `by_group_threshold`: the granularity ablation: experts partitioned into groups
  of G (contiguously, or greedily by co-activation), whole groups selected by summed score.
"""

from __future__ import annotations

import numpy as np


def _ranked(scores_e: np.ndarray) -> list[int]:
    return sorted(range(scores_e.size), key=lambda e: (-scores_e[e], e))


def by_threshold(scores_le: np.ndarray, p: float) -> list[list[int]]:
    if not 0 < p <= 1:
        raise ValueError(f"threshold p={p} must lie in (0, 1]")
    selected = []
    for scores in np.asarray(scores_le, np.float64):
        chosen, total = [], 0.0
        for e in _ranked(scores):
            chosen.append(e)
            total += scores[e]
            if total >= p:
                break
        selected.append(chosen)
    return selected


def top_n(scores_le: np.ndarray, n: int) -> list[list[int]]:
    return [_ranked(scores)[:n] for scores in np.asarray(scores_le, np.float64)]


def random_like(reference: list[list[int]], num_experts: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.choice(num_experts, len(ids), replace=False).tolist() for ids in reference]


def group_experts(
    scores_e: np.ndarray, coactivation_ee: np.ndarray | None, size: int
) -> list[list[int]]:
    """Partition E experts into groups of `size`: contiguous ids when coactivation is None, else
    greedily: seed a group with the best-scoring free expert, then add the free expert most often
    co-activated with the group's members (ties: higher score, then lower id)."""
    num_experts = scores_e.size
    if num_experts % size:
        raise ValueError(f"group size {size} does not divide {num_experts} experts")
    if coactivation_ee is None:
        return [list(range(g, g + size)) for g in range(0, num_experts, size)]
    free = set(range(num_experts))
    groups = []
    while free:
        group = [min(free, key=lambda e: (-scores_e[e], e))]
        free.remove(group[0])
        while len(group) < size:
            best = min(free, key=lambda e: (-coactivation_ee[group, e].sum(), -scores_e[e], e))
            group.append(best)
            free.remove(best)
        groups.append(group)
    return groups


def by_group_threshold(
    scores_le: np.ndarray, groups_per_layer: list[list[list[int]]], p: float
) -> list[list[int]]:
    """Whole groups in descending summed score (ties: lower first member) until the sum reaches p."""
    selected = []
    for scores, groups in zip(np.asarray(scores_le, np.float64), groups_per_layer):
        group_scores = np.array([scores[g].sum() for g in groups])
        order = sorted(range(len(groups)), key=lambda i: (-group_scores[i], groups[i][0]))
        chosen, total = [], 0.0
        for i in order:
            chosen += groups[i]
            total += group_scores[i]
            if total >= p:
                break
        selected.append(chosen)
    return selected


METHODS = ("threshold", "top_n", "random", "group")
GROUPINGS = ("coactivation", "contiguous")


def per_layer(
    scores_le: np.ndarray,
    method: str = "threshold",
    *,
    p: float = 0.2,
    n: int = 1,
    seed: int = 0,
    group_size: int = 1,
    grouping: str = "coactivation",
    coactivation_lee: np.ndarray | None = None,
) -> list[list[int]]:
    """One entry point for every method (names in METHODS); `random` draws as many experts per
    layer as `threshold` would select at p."""
    if method == "threshold":
        return by_threshold(scores_le, p)
    if method == "top_n":
        return top_n(scores_le, n)
    if method == "random":
        return random_like(by_threshold(scores_le, p), scores_le.shape[1], seed)
    if method == "group":
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping={grouping!r}: expected one of {GROUPINGS}")
        groups = [
            group_experts(s, None if grouping == "contiguous" else coactivation_lee[li], group_size)
            for li, s in enumerate(scores_le)
        ]
        return by_group_threshold(scores_le, groups, p)
    raise ValueError(f"method={method!r}: expected one of {METHODS}")

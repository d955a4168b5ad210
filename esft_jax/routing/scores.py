"""Expert relevance scores from routing statistics ([L, E], float64).

kind:
- "token": Token Selection Ratio: the share of a token's k choices that went to the expert.
- "gate":  Average Gate Score: the expert's mean gate weight per token.
norm:
- "pooled": over all tokens at once (sum / total tokens): what the official ESFT release computed.
- "paper":  mean over sequences of per-sequence means, the formula of the paper (Eq. 5-6).
decimals: round like the official summary.json (4) or not (None).

The official code later renormalised scores across layers before selecting (its issue #17); that is
a bug, and is not reproduced here: every layer's scores sum to 1 (token) or to the mean gate mass.
"""

from __future__ import annotations

import numpy as np

from esft_jax.routing.stats import RoutingStats

KINDS = ("token", "gate")
NORMS = ("pooled", "paper")


def expert_scores(
    stats: RoutingStats, kind: str = "token", norm: str = "pooled", decimals: int | None = None
) -> np.ndarray:
    if kind not in KINDS or norm not in NORMS:
        raise ValueError(f"score kind {kind!r} / norm {norm!r}: expected one of {KINDS} / {NORMS}")
    if stats.tokens == 0:
        raise ValueError("routing statistics hold no tokens")
    if norm == "pooled":
        scores = (
            stats.counts / (stats.top_k * stats.tokens)
            if kind == "token"
            else stats.gate_sum / stats.tokens
        )
    else:
        frac = stats.seq_count_frac / stats.top_k if kind == "token" else stats.seq_gate_frac
        scores = frac / stats.sequences
    return np.round(scores, decimals) if decimals is not None else scores


def official_summary(stats: RoutingStats, decimals: int | None = 4) -> dict:
    """The official summary.json layout (pooled scores, string keys), plus our totals."""

    def by_layer(kind: str) -> dict:
        s = expert_scores(stats, kind, "pooled", decimals)
        return {
            str(layer): {str(e): float(s[i, e]) for e in range(stats.num_experts)}
            for i, layer in enumerate(stats.layers)
        }

    return {
        "token_scores": by_layer("token"),
        "gate_scores": by_layer("gate"),
        "tokens": stats.tokens,
        "sequences": stats.sequences,
        "top_k": stats.top_k,
    }

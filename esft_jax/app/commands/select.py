"""`esft select`: experts per layer from routing statistics, as an ESFT expert config."""

from __future__ import annotations

import ml_collections

from esft_jax import report
from esft_jax.app.checks import input_path, number, one_of, whole, writable_file
from esft_jax.expert_config import ExpertConfig
from esft_jax.routing import scores, select
from esft_jax.routing.expected import expected_coverage
from esft_jax.routing.sources import load_stats
from esft_jax.routing.stats import RoutingStats


def check_selection(c: ml_collections.ConfigDict, prefix: str = "") -> None:
    one_of(c, f"{prefix}score", scores.KINDS)
    one_of(c, f"{prefix}norm", scores.NORMS)
    one_of(c, f"{prefix}method", select.METHODS)
    number(c, f"{prefix}p", 0.0, 1.0, low_open=True)
    whole(c, f"{prefix}group_size")


def check(c: ml_collections.ConfigDict) -> None:
    input_path(
        c, "stats", "routing statistics (esft profile's out_dir, stats.npz or official logs)"
    )
    check_selection(c)
    whole(c, "n")
    if c.decimals is not None:
        whole(c, "decimals", 0)
    writable_file(c, "out")


def run(c: ml_collections.ConfigDict) -> None:
    """Select experts per layer from routing statistics; write an ESFT expert config."""
    stats = load_stats(c.stats, c.top_k, c.num_experts)
    expert_config = select_experts(stats, c, c.seed)
    path = expert_config.save(c.out)
    counts = [len(expert_config.experts[layer]) for layer in stats.layers]
    total = len(stats.layers) * stats.num_experts
    print(
        report.markdown_table(
            ["layer", *map(str, stats.layers)],
            [["experts", *map(str, counts)]],
            right=[False] + [True] * len(counts),
        )
    )
    print(
        f"{c.method} on {c.score} scores ({c.norm}, decimals={c.decimals}, p={c.p}): "
        f"{sum(counts)} of {total} routed experts ({sum(counts) / total:.1%} of routed-expert parameters) "
        f"-> {path}"
    )


def select_experts(stats: RoutingStats, spec: ml_collections.ConfigDict, seed: int) -> ExpertConfig:
    """The expert config of one selection (config_blocks.selection's fields) from routing statistics,
    with its routing profile (the coverage the selection has on those statistics' data)."""
    s = scores.expert_scores(stats, spec.score, spec.norm, spec.decimals)
    chosen = select.per_layer(
        s,
        spec.method,
        p=spec.p,
        n=spec.n,
        seed=seed,
        group_size=spec.group_size,
        grouping=spec.grouping,
        coactivation_lee=stats.coactivation,
    )
    if spec.shared_only:
        chosen = [[] for _ in chosen]
    experts = dict(zip(stats.layers, chosen))
    return ExpertConfig(
        experts,
        spec.shared_experts,
        spec.non_expert_modules,
        profile=expected_coverage(stats, experts),
    )

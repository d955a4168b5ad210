"""`esft analyze`: how concentrated each task's routing is, how tasks overlap, and (with
drift.before and drift.after) how fine-tuning moved a task's routing.

    esft analyze --config configs/analyze.py:reference    # the official DeepSeek-V2-Lite logs in ../shared
    esft analyze --config configs/analyze.py:drift --config.drift.before=runs/intent \
        --config.drift.after=runs/intent-esft-profile \
        --config.drift.experts=runs/intent-esft/expert_config.json
Writes <out_dir>/routing.md and a heatmap PNG per task; with drift, <out_dir>/drift.md and drift.png.
"""

import os

import ml_collections

REFERENCE = os.environ.get("ESFT_REFERENCE", "../shared/esft-reference")


def get_config(which: str = "reference") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    if which == "reference":
        c.tasks = ml_collections.ConfigDict(
            {t: f"{REFERENCE}/results/expert_scores/{t}" for t in ("intent", "law")}
        )
    elif which == "drift":  # no tasks: the drift only
        c.tasks = ml_collections.ConfigDict()
    else:  # comma-separated name=path pairs
        c.tasks = ml_collections.ConfigDict(dict(pair.split("=", 1) for pair in which.split(",")))
    c.top_k = 6  # official logs only
    c.num_experts = 64
    c.p = 0.2
    # routing drift (esft_jax/routing/drift.py): one task's statistics before fine-tuning (esft
    # profile of the base) and after (esft profile --config.adapter=...); experts: the adapter's
    # expert config, whose coverage is compared ("": the experts the rule selects before); the
    # selection rule compared on both: score "token" or "gate", norm "pooled" or "paper", threshold p
    c.drift = ml_collections.ConfigDict(
        dict(before="", after="", experts="", score="token", norm="pooled", p=0.2)
    )
    c.out_dir = "docs/routing"
    return c

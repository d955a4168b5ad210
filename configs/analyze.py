"""`esft analyze`: how concentrated each task's routing is, and how tasks overlap.

    esft analyze --config configs/analyze.py:reference    # the official DeepSeek-V2-Lite logs in ../shared
Writes <out_dir>/routing.md and a heatmap PNG per task.
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
    else:  # comma-separated name=path pairs
        c.tasks = ml_collections.ConfigDict(dict(pair.split("=", 1) for pair in which.split(",")))
    c.top_k = 6  # official logs only
    c.num_experts = 64
    c.p = 0.2
    c.out_dir = "docs/routing"
    return c

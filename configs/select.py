"""`esft select`: per-layer expert selection from routing statistics -> an ESFT expert config.

    esft select --config configs/select.py:token --config.stats=runs/intent          # ESFT-Token, p=0.2
    esft select --config configs/select.py:gate --config.stats=runs/intent           # ESFT-Gate, p=0.1
    esft select --config configs/select.py:token \
        --config.stats=../shared/esft-reference/results/expert_scores/intent          # official logs
"""

import ml_collections

from esft_jax.app import config_blocks as blocks

PRESETS = {"token": ("token", 0.2), "gate": ("gate", 0.1)}  # the paper's ESFT-Token / ESFT-Gate


def get_config(preset: str = "token") -> ml_collections.ConfigDict:
    score, p = PRESETS[preset]
    # score: "token" (Token Selection Ratio) or "gate" (Average Gate Score); norm: "pooled" (official
    # release) or "paper" (mean of per-sequence means); decimals: round scores (None: exact);
    # method: "threshold", "top_n" (n), "random" (threshold's counts, seed), "group" (group_size,
    # grouping: "coactivation" or "contiguous"); shared_experts, non_expert_modules: flags written into
    # the expert config; shared_only: no routed experts
    decimals = ml_collections.FieldReference(4, field_type=int)
    c = blocks.selection(score, p, decimals=decimals, n=4, group_size=2)
    c.stats = ""  # stats.npz / a profile out_dir / an official log directory
    c.top_k = 6  # official logs only: the model's top-k and expert count (DeepSeek-V2-Lite's)
    c.num_experts = 64
    c.seed = 0
    c.out = "runs/select/expert_config.json"
    return c

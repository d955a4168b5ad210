"""`esft select`: per-layer expert selection from routing statistics -> an ESFT expert config.

    esft select --config configs/select.py:token --config.stats=runs/intent          # ESFT-Token, p=0.2
    esft select --config configs/select.py:gate --config.stats=runs/intent           # ESFT-Gate, p=0.1
    esft select --config configs/select.py:token \
        --config.stats=../shared/esft-reference/results/expert_scores/intent          # official logs
"""

import ml_collections

PRESETS = {"token": ("token", 0.2), "gate": ("gate", 0.1)}  # the paper's ESFT-Token / ESFT-Gate


def get_config(preset: str = "token") -> ml_collections.ConfigDict:
    score, p = PRESETS[preset]
    c = ml_collections.ConfigDict()
    c.stats = ""  # stats.npz / a profile out_dir / an official log directory
    c.top_k = 6  # official logs only: the model's top-k and expert count (DeepSeek-V2-Lite's)
    c.num_experts = 64
    c.score = score  # "token" (Token Selection Ratio) or "gate" (Average Gate Score)
    c.norm = "pooled"  # "pooled" (official release) or "paper" (mean of per-sequence means)
    c.decimals = ml_collections.FieldReference(4, field_type=int)  # round scores; None: exact
    c.method = "threshold"  # "threshold", "top_n", "random" (threshold's counts), "group"
    c.p = p
    c.n = 4  # top_n
    c.seed = 0  # random
    c.group_size = 2  # group
    c.grouping = "coactivation"  # group: "coactivation" or "contiguous"
    c.shared_experts = False  # flags written into the expert config for training
    c.non_expert_modules = False
    c.out = "runs/select/expert_config.json"
    return c

"""What the training methods are built from: typed, so the library never reads a config file's
ConfigDict (the app layer fills these from configs/train.py's fields)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MethodSettings:
    # esft: the expert-config file to train; "" (esft plan) takes the first
    # round(expert_fraction * E) experts of every MoE layer
    expert_config: str = ""
    expert_fraction: float = 0.1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("attention", "experts")
    seed: int = 0  # lora: the A factors' initialisation

"""AdamW with warmup + cosine (or constant) learning rate and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class Optim:
    """configs/train.py's `optim` block."""

    lr: float
    steps: int  # the schedule's length
    schedule: str = "cosine"  # or "constant"
    warmup_steps: int = 0
    end_lr_fraction: float = 0.1  # cosine: the last step's share of lr
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # the global norm gradients are clipped to; 0: none


def learning_rate(o: Optim) -> optax.Schedule:
    if o.schedule == "constant":
        decay = optax.constant_schedule(o.lr)
    elif o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(
            o.lr, max(1, o.steps - o.warmup_steps), alpha=o.end_lr_fraction
        )
    else:
        raise ValueError(f"schedule={o.schedule!r}: expected 'cosine' or 'constant'")
    if not o.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    return optax.join_schedules([warmup, decay], [o.warmup_steps])


def make_optimizer(o: Optim) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate(o), b1=o.adam_b1, b2=o.adam_b2, eps=o.adam_eps, weight_decay=o.weight_decay
    )
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip else adamw

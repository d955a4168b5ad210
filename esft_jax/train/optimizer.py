"""AdamW with warmup + cosine (or constant) learning rate and global-norm clipping (optax)."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate(c: ml_collections.ConfigDict) -> optax.Schedule:
    """c: lr, warmup_steps, schedule ("cosine" | "constant"), end_lr_fraction, steps."""
    if c.schedule == "constant":
        decay = optax.constant_schedule(c.lr)
    elif c.schedule == "cosine":
        decay = optax.cosine_decay_schedule(
            c.lr, max(1, c.steps - c.warmup_steps), alpha=c.end_lr_fraction
        )
    else:
        raise ValueError(f"schedule={c.schedule!r}: expected 'cosine' or 'constant'")
    if not c.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, c.lr, c.warmup_steps)
    return optax.join_schedules([warmup, decay], [c.warmup_steps])


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """c: the learning-rate fields plus adam_b1, adam_b2, adam_eps, weight_decay, grad_clip (0: none)."""
    adamw = optax.adamw(
        learning_rate(c), b1=c.adam_b1, b2=c.adam_b2, eps=c.adam_eps, weight_decay=c.weight_decay
    )
    return optax.chain(optax.clip_by_global_norm(c.grad_clip), adamw) if c.grad_clip else adamw

"""The divergence guard: a run that goes non-finite stops, naming the step, instead of saving NaN.

The train step reports `finite` with its metrics (its loss, gradient norm and updated parameters are
all finite). The loop keeps the device metrics of the steps since it last looked, and looks only where
it syncs with the device anyway: on a logged step (the metrics are fetched) and before a checkpoint
save. The first non-finite step raises DivergedError, so no checkpoint, metrics record or adapter is
written from a state that followed it and the latest checkpoint stays the last finite one. The state
itself is left as the step computed it (no select over the whole state, so the update stays in
place): nothing ever saves it.

A gradient norm of exactly 0 means a batch without a trained token (its answers cut off by the
sequence length), or, after the first step with a learning rate above 0 and trained tokens, that
training has stopped learning (typically an lr so large that the first update saturated the model):
one warning for each.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


class DivergedError(RuntimeError):
    """A step's loss, gradient norm or update was not finite; the message names the step."""


def finite(loss: jax.Array, grad_norm: jax.Array, params: Any) -> jax.Array:
    """() bool: loss, gradient norm and every parameter finite (inside the jitted step)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(params)]
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.stack(leaves))


def _what_went_wrong(m: dict) -> str:
    if not math.isfinite(m["loss"]):
        return f"loss is {m['loss']:g} (grad_norm {m['grad_norm']:g})"
    if not math.isfinite(m["grad_norm"]):
        return f"grad_norm is {m['grad_norm']:g} (loss {m['loss']:g})"
    return (
        "the update made the trainable parameters non-finite "
        f"(loss {m['loss']:g}, grad_norm {m['grad_norm']:g})"
    )


def check(
    recent: list[tuple[int, dict]], latest_checkpoint: Callable[[], int | None]
) -> list[tuple[int, dict]]:
    """Fetch `recent` (step number, device metrics) to the host; DivergedError at the first
    non-finite step, naming it and the checkpoint kept."""
    fetched = jax.device_get(recent)
    for step, m in fetched:
        if not m["finite"]:
            kept = latest_checkpoint()
            where = (
                "no checkpoint was saved"
                if kept is None
                else f"the latest checkpoint (step {kept}) is kept"
            )
            raise DivergedError(
                f"step {step}: {_what_went_wrong(m)}; stopped, {where}; lower --config.optim.lr"
            )
    return fetched


def warn_if_stalled(step: int, m: dict, warned: set[str]) -> None:
    """Print a warning the first time a logged step has a zero gradient for each of two reasons: its
    batch holds no trained token (every answer in it cut off by the sequence length), or, after the
    first step at a positive lr, the model is saturated. `warned` holds the reasons warned of."""
    if m["grad_norm"] != 0:
        return
    if m["tokens"] == 0:
        reason, message = (
            "no tokens",
            "its batch holds no trained token (each answer in it lies beyond "
            "--config.data.seq_len), so it trained nothing; lengthen --config.data.seq_len or "
            "drop the samples whose prompts fill it",
        )
    elif step > 1 and m["lr"] > 0:
        reason, message = (
            "saturated",
            f"the gradient norm is exactly 0 at lr {m['lr']:g}: training has stopped learning "
            "(a too large lr saturates the model); lower --config.optim.lr",
        )
    else:
        return
    if reason not in warned:
        warned.add(reason)
        print(f"warning: step {step}: {message}", file=sys.stderr)

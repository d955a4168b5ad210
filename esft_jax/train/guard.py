"""The divergence guard: a run that goes non-finite stops, naming the step, instead of saving NaN.

The train step reports `finite` with its metrics (its loss, gradient norm and updated parameters are
all finite). The loop keeps the device metrics of the steps since it last looked, and looks only where
it syncs with the device anyway: on a logged step (the metrics are fetched) and before a checkpoint
save. The first non-finite step raises DivergedError, so no checkpoint, metrics record or adapter is
written from a state that followed it and the latest checkpoint stays the last finite one. The state
itself is left as the step computed it (no select over the whole state, so the update stays in
place): nothing ever saves it.

A gradient norm of exactly 0 after the first step, with a learning rate above 0, means training has
stopped learning (typically an lr so large that the first update saturated the model): one warning.
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


def warn_if_stalled(step: int, m: dict, warned: bool) -> bool:
    """Print one warning the first time a logged step after the first has a zero gradient at a
    positive lr; returns whether it has warned."""
    if warned or step <= 1 or m["lr"] <= 0 or m["grad_norm"] != 0:
        return warned
    print(
        f"warning: step {step}: the gradient norm is exactly 0 at lr {m['lr']:g}: training has stopped "
        "learning (a too large lr saturates the model); lower --config.optim.lr",
        file=sys.stderr,
    )
    return True

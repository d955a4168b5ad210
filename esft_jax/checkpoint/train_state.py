"""Training checkpoints with orbax: the trainable state, the optimizer state and the data position.

Each save is written to a temporary directory and renamed when complete (orbax's atomic commit), so a
run killed mid-save leaves the previous checkpoint intact; the last `keep` are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp


class TrainCheckpoints:
    def __init__(self, directory: str | Path, save_every: int, keep: int):
        options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(Path(directory).resolve(), options=options)

    def save(self, step: int, state: Any, data_state: Callable[[], dict], force: bool = False) -> bool:
        """Save if `step` is on the interval (or force); returns whether it saved. data_state is called
        only then (in a multi-process run it gathers every process's data position)."""
        if not (force or self._manager.should_save(step)):
            return False
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state())), force=force)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """(step, state, data_state) of `step` (default the latest); abstract_state gives the
        shapes, dtypes and shardings to restore into (jax.ShapeDtypeStruct leaves)."""
        step = self._manager.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, restored["state"], restored["data"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

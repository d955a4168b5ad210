"""Training checkpoints with orbax: the trainable state, the optimizer state and the data position.

Each save is written to a temporary directory and renamed when complete (orbax's atomic commit), so a
run killed mid-save leaves the previous checkpoints intact; the last `keep` are kept (an older one is
deleted only after a newer one is committed). Saves run in the background: one that fails (a full
disk) surfaces at the next save or at close() as one CheckpointError naming its step, and the noise
of it from orbax's threads is held back (its logged tracebacks, and tensorstore's late callbacks
into orbax's closed event loop, "RuntimeError: Event loop is closed"). A checkpoint that cannot be read
(truncated or garbled files) is moved aside to `<step>.unreadable` with a warning, and the newest
readable one is restored instead. One whose arrays have other shapes than the run's (an ESFT run of an
esft-jax that kept the trained experts compact, [N, d, f]) is refused in one line and left as it is.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from esft_jax.checkpoint.hf import CheckpointError


class _HoldBackOrbaxErrors(logging.Filter):
    """Drops the errors orbax logs (with tracebacks) from its save threads: each failure also reaches
    the caller as an exception, which TrainCheckpoints reports as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _hold_back_background_noise() -> None:
    """Once per process: the filter above on absl's logger (orbax logs through absl), and an
    unraisable-exception hook dropping the 'Event loop is closed' errors of tensorstore writes that
    finish after a failed save has closed orbax's event loop (they arrive late, even after close()),
    and the errors of orbax's array reads left behind by a failed restore (collected later)."""
    if any(isinstance(f, _HoldBackOrbaxErrors) for f in logging.getLogger("absl").filters):
        return
    logging.getLogger("absl").addFilter(_HoldBackOrbaxErrors())
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        closed_loop = (
            isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
            and unraisable.object is None
        )
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
        orbax_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        if not (closed_loop or orbax_read):
            previous(unraisable)

    sys.unraisablehook = hook


def reason(error: BaseException) -> str:
    """The root cause of an orbax / tensorstore failure in a few words: '[Errno 28] No space left on
    device' for an OS error (tensorstore reports those as "... [os_error_code='28']")."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return f"[Errno {seen.errno}] {seen.strerror or os.strerror(seen.errno)}"
        code = re.search(r"os_error_code='?(\d+)", str(seen))
        if code:
            return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
        seen = seen.__cause__ or seen.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


class TrainCheckpoints:
    def __init__(self, directory: str | Path, save_every: int, keep: int):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
        )
        _hold_back_background_noise()
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._in_flight: int | None = None  # the step whose background save may still be running

    def due(self, step: int, force: bool = False) -> bool:
        """Whether `step` is a checkpoint step (on the interval, or forced)."""
        return force or self._manager.should_save(step)

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Start saving `state` and the data position as `step` (in the background)."""
        self._wait()
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
                ),
                force=True,
            )
        except Exception as e:  # orbax and tensorstore raise their own types for an I/O failure
            raise self._write_error(step, e) from None
        self._in_flight = step

    def latest_step(self) -> int | None:
        """The newest committed checkpoint (after any save in flight has finished)."""
        self._wait()
        return self._manager.latest_step()

    def restore(self, abstract_state: Any) -> tuple[int, Any, dict]:
        """(step, state, data_state) of the newest readable checkpoint; abstract_state gives the shapes,
        dtypes and shardings to restore into (jax.ShapeDtypeStruct leaves)."""
        unreadable: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except (
                Exception
            ) as e:  # truncated or garbled files: orbax, tensorstore and json each raise theirs
                _refuse_other_shapes(e, self.directory / str(step))
                unreadable.append((step, reason(e)))
                continue
            self._set_aside(unreadable, step)
            return step, restored["state"], restored["data"]
        listed = "; ".join(f"step {s}: {why}" for s, why in unreadable) or "there is none"
        raise CheckpointError(
            f"{self.directory}: no checkpoint can be read ({listed}); delete the directory "
            f"to start over, or use another --config.workdir"
        )

    def close(self) -> None:
        self._wait()
        self._manager.close()

    def _wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(self._in_flight, e) from None

    def _write_error(self, step: int | None, error: Exception) -> CheckpointError:
        return CheckpointError(
            f"{self.directory}/{step}: could not write the checkpoint: {reason(error)}; "
            f"the earlier checkpoints are kept"
        )

    def _set_aside(self, unreadable: list[tuple[int, str]], restored: int) -> None:
        """Move the unreadable checkpoints newer than `restored` out of orbax's way (kept for a look)."""
        for step, why in unreadable if jax.process_index() == 0 else ():
            names = (self.directory / f"{step}.unreadable{i or ''}" for i in itertools.count())
            aside = next(name for name in names if not name.exists())
            os.replace(self.directory / str(step), aside)
            print(
                f"warning: {self.directory}/{step}: cannot read this checkpoint ({why}); resuming from "
                f"step {restored}, the unreadable one is kept as {aside}",
                file=sys.stderr,
            )
        if unreadable:
            ocp.multihost.sync_global_processes("esft_checkpoints_set_aside")
            self._manager.reload()


def _refuse_other_shapes(error: BaseException, checkpoint: Path) -> None:
    """CheckpointError if `error` is orbax's for an array saved with another shape than the run's: the
    checkpoint is whole but of another layout, so neither moved aside nor skipped."""
    found = re.search(
        r"Requested shape: (\(.*?\)) is not compatible with the stored shape: (\(.*?\))", str(error)
    )
    if found:
        raise CheckpointError(
            f"{checkpoint}: it holds an array of shape {found[2]} where this run has {found[1]}: "
            "written by an earlier esft-jax (its ESFT runs kept the trained experts as [N, d, f]; "
            "they are [layers, slots, d, f] now) or for another run; finish it with the version "
            "that wrote it, or use another --config.workdir"
        ) from None


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

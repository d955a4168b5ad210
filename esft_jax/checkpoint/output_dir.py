"""Writing an output directory without destroying anything.

A writer stages its files in a fresh temporary directory beside `out_dir` and moves it into place
when complete, so an interrupted write leaves `out_dir` as it was. It replaces an existing `out_dir`
only when that directory is empty or holds nothing but files the caller may replace (a previous
export's, listed in its marker file), and never when `out_dir` is, contains or lies inside an input.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

from esft_jax.checkpoint.errors import CheckpointError

# {"written_by": ..., "files": [...]}: what a previous export wrote here
MARKER = "esft_export.json"


class OutputDirError(CheckpointError):
    """An output directory that writing would destroy something in; the message starts with its path."""


def check_not_input(out_dir: Path, inputs: Collection[str | Path]) -> None:
    """Refuse an `out_dir` that is an input, lies inside one or contains one (resolved paths)."""
    out = out_dir.resolve()
    for given in inputs:
        source = Path(given).resolve()
        relation = (
            "is"
            if out == source
            else "lies inside"
            if out.is_relative_to(source)
            else "contains"
            if source.is_relative_to(out)
            else None
        )
        if relation:
            raise OutputDirError(
                f"{out_dir}: {relation} the input {given}; write to a directory outside the inputs"
            )


def marked_files(out_dir: Path) -> frozenset[str]:
    """The files (with the marker) that a previous export listed in `out_dir`'s marker; empty if none."""
    path = out_dir / MARKER
    try:
        marker = json.loads(path.read_text())
        return frozenset([*marker["files"], MARKER])
    except (OSError, ValueError, KeyError, TypeError):
        return frozenset()


def export_replaceable(
    out_dir: Path,
    overwrite: bool,
    inputs: Collection[str | Path] = (),
    overwrite_flag: str = "overwrite=True",
) -> frozenset[str]:
    """The names in `out_dir` an export may replace; raises unless the directory is new, empty, or (with
    `overwrite`) a previous export of ours holding nothing else. Cheap: call it before the work too;
    `overwrite_flag` is how the caller's user sets `overwrite`, for the message."""
    check_not_input(out_dir, inputs)
    present = _entries(out_dir)
    if not present:
        return frozenset()
    ours = marked_files(out_dir)
    if not ours:
        raise OutputDirError(
            f"{out_dir}: not empty and not an esft export (no {MARKER}; holds "
            f"{_some(present)}); choose a new or empty directory"
        )
    if not overwrite:
        raise OutputDirError(
            f"{out_dir}: holds a previous export; set {overwrite_flag} to replace it"
        )
    foreign = present - ours
    if foreign:
        raise OutputDirError(
            f"{out_dir}: holds files the previous export did not write ({_some(foreign)}); "
            "move them away or choose another directory"
        )
    return ours


def write_marker(staged: Path, written_by: str) -> None:
    """List every file in `staged` in its marker, so that a later export recognises them as its own."""
    files = sorted(p.name for p in staged.iterdir())
    (staged / MARKER).write_text(
        json.dumps({"written_by": written_by, "files": files}, indent=1) + "\n"
    )


@contextlib.contextmanager
def staged_dir(
    out_dir: str | Path, *, replaceable: Collection[str], inputs: Collection[str | Path] = ()
) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out_dir`; when the block completes it becomes `out_dir`.

    Raises OutputDirError before anything is written when `out_dir` overlaps an input or holds a name
    not in `replaceable`. On an error in the block, `out_dir` is untouched and the temporary removed.
    """
    out_dir = Path(out_dir)
    check_not_input(out_dir, inputs)
    foreign = _entries(out_dir) - set(replaceable)
    if foreign:
        raise OutputDirError(
            f"{out_dir}: holds files this writer did not write ({_some(foreign)}); "
            "move them away or choose another directory"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield staged
        if out_dir.exists():  # move the old one aside first, so that a failed rename loses nothing
            old = Path(
                tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent)
            )
            out_dir.rename(old / out_dir.name)
            try:
                staged.rename(out_dir)
            except OSError:
                (old / out_dir.name).rename(out_dir)
                raise
            shutil.rmtree(old)
        else:
            staged.rename(out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _entries(out_dir: Path) -> frozenset[str]:
    if not out_dir.exists():
        return frozenset()
    if not out_dir.is_dir():
        raise OutputDirError(f"{out_dir}: exists and is not a directory")
    return frozenset(p.name for p in out_dir.iterdir())


def _some(names: Collection[str]) -> str:
    shown = sorted(names)[:3]
    return ", ".join(shown) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

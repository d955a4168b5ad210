"""Every command's config, checked once, up front, before any work starts or any file is written.

`check(command, c)` raises ConfigFileError naming the first bad `--config.KEY`: a value out of
range, a choice that does not exist, an input that is missing or empty, an output directory that
cannot be written. Checks that need the loaded model or data (seq_len against the model's
positions, a training run's resume rules) live with the code that has them; these need neither.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from esft_jax.app.config_files import ConfigFileError
from esft_jax.app.runtime import RANDOM_WEIGHTS, RUNTIME_FIELDS
from esft_jax.data.chat import TEMPLATES
from esft_jax.model import ModelConfig

SCORES, NORMS = ("token", "gate"), ("pooled", "paper")


def value_at(c: ml_collections.ConfigDict, key: str) -> Any:
    for name in key.split("."):
        c = c[name]
    return c


def whole(c: ml_collections.ConfigDict, key: str, minimum: int = 1) -> None:
    value = value_at(c, key)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ConfigFileError(f"--config.{key}={value!r}: expected a whole number >= {minimum}")


def number(
    c: ml_collections.ConfigDict,
    key: str,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
) -> None:
    """low <= value <= high (low < value when low_open)."""
    value = value_at(c, key)
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if not ok:
        where = (
            f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            if math.isfinite(high)
            else f"{'>' if low_open else '>='} {low:g}"
        )
        raise ConfigFileError(f"--config.{key}={value!r}: expected a number {where}")


def boolean(c: ml_collections.ConfigDict, key: str) -> None:
    value = value_at(c, key)
    if not isinstance(value, bool):
        raise ConfigFileError(f"--config.{key}={value!r}: expected True or False")


def one_of(c: ml_collections.ConfigDict, key: str, options: Sequence[str]) -> None:
    value = value_at(c, key)
    if value not in options:
        raise ConfigFileError(
            f"--config.{key}={value!r}: expected one of {', '.join(map(str, options))}"
        )


def template(c: ml_collections.ConfigDict, key: str) -> None:
    """A chat template choice (data/chat.py): model, esft or an existing .jinja file."""
    value = value_at(c, key)
    if value in TEMPLATES:
        return
    if not (isinstance(value, str) and value.endswith(".jinja")):
        raise ConfigFileError(
            f"--config.{key}={value!r}: expected {', '.join(TEMPLATES)} or a path ending in .jinja"
        )
    if not Path(value).is_file():
        raise ConfigFileError(f"--config.{key}={value}: no such file")


def required(c: ml_collections.ConfigDict, key: str, what: str) -> None:
    if not value_at(c, key):
        raise ConfigFileError(f"--config.{key}: name {what}")


def input_path(c: ml_collections.ConfigDict, key: str, what: str) -> None:
    """A required input file or directory that exists (and, for a file, is not empty)."""
    required(c, key, what)
    path = Path(value_at(c, key))
    if not path.exists():
        raise ConfigFileError(f"--config.{key}={path}: no such file or directory")
    if path.is_file() and path.stat().st_size == 0:
        raise ConfigFileError(f"--config.{key}={path}: the file is empty")


def _writable(where: str, directory: Path) -> None:
    """`directory` can be created and written (probed with a temporary file), so a command fails
    before its work, not after it; `where` ("--config.KEY=value") starts the message."""
    if directory.exists() and not directory.is_dir():
        raise ConfigFileError(f"{where}: exists and is not a directory")
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigFileError(f"{where}: {existing} is a file, not a directory")
    try:  # as root, permission bits say little: try it (a read-only or full file system refuses)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigFileError(f"{where}: cannot write in {existing} ({e.strerror})") from None


def writable_dir(c: ml_collections.ConfigDict, key: str) -> None:
    """An output directory that can be created and written."""
    _writable(f"--config.{key}={value_at(c, key)}", Path(value_at(c, key)))


def writable_file(c: ml_collections.ConfigDict, key: str) -> None:
    """An output file whose directory can be written."""
    required(c, key, "an output file")
    _writable(f"--config.{key}={value_at(c, key)}", Path(value_at(c, key)).parent)


DEFAULT_SEQ_LEN = 4096  # the paper's rows (ESFT trains and profiles 4096-token sequences)


def within_positions(c: ml_collections.ConfigDict, key: str, cfg: ModelConfig) -> None:
    """A sequence length the model has positions for (checked once the model's config is read).
    0, the configs' default, is set to DEFAULT_SEQ_LEN, or the model's positions where it has fewer
    (the built-in model: 2048), so a default works on any model."""
    value = value_at(c, key)
    if value == 0:
        value = min(DEFAULT_SEQ_LEN, cfg.max_position_embeddings)
        parent, _, leaf = key.rpartition(".")
        (value_at(c, parent) if parent else c)[leaf] = value
    if value > cfg.max_position_embeddings:
        raise ConfigFileError(
            f"--config.{key}={value}: longer than the model's {cfg.max_position_embeddings} "
            f"positions (max_position_embeddings)"
        )


def architecture_override(where: str, key: str, checkpoint: str) -> None:
    """`key` ("model.FIELD") may be overridden with `checkpoint`: any field without one or with
    random weights, only the runtime fields with a Hugging Face checkpoint (its config.json has the rest)."""
    *parents, leaf = key.split(".")
    if parents[-1:] != ["model"] or leaf in RUNTIME_FIELDS or checkpoint in ("", RANDOM_WEIGHTS):
        return
    raise ConfigFileError(
        f"{where}: {leaf} comes from the checkpoint's config.json ({checkpoint}); "
        f"with a checkpoint only model.{{{','.join(RUNTIME_FIELDS)}}} apply"
    )


def model_overrides(c: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Raise ConfigFileError for a `--config.[...]model.FIELD=` override that a checkpoint would
    silently ignore (config_blocks.py: the model contract)."""
    for item in overrides:
        key = item.partition("=")[0]
        parents = key.split(".")[:-2]  # the block holding `model` and its `checkpoint`
        node = value_at(c, ".".join(parents)) if parents else c
        if isinstance(node, ml_collections.ConfigDict):
            architecture_override(f"--config.{key}", key, node.get("checkpoint", ""))

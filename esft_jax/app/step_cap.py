"""ESFT_MAX_STEPS=N: a command's long loops cut to N steps, to try any command (the README's) in seconds.

A step is a command's unit of work: an optimizer step (train, its validation and routing profile a
batch each), a profiled batch (profile), a batch of generations or of held-out text (eval). The cap
only ever shrinks a setting, leaves every other one as written, and says on stderr what it cut, so
a capped run is never taken for a real one. `esft run` passes the variable on to the commands it
launches.
"""

from __future__ import annotations

import os
import sys

import ml_collections

from esft_jax.app.checks import DEFAULT_SEQ_LEN
from esft_jax.app.config_files import ConfigFileError

ENV = "ESFT_MAX_STEPS"


def _node(c: ml_collections.ConfigDict, dotted: str) -> ml_collections.ConfigDict:
    for name in filter(None, dotted.split(".")):
        c = c[name]
    return c


def _shrink(c: ml_collections.ConfigDict, key: str, most: int, cut: list[str]) -> None:
    """c[key] (dotted) = min(c[key], most), 0 counting as "all"; the change noted in `cut`."""
    parent, _, leaf = key.rpartition(".")
    node = _node(c, parent)
    if node[leaf] == 0 or node[leaf] > most:
        cut.append(f"{key} {node[leaf]} -> {most}")
        node[leaf] = most


def _study(c: ml_collections.ConfigDict, prefix: str, steps: int, cut: list[str]) -> None:
    """An `esft run` study's in-process steps (profile, eval); its `esft train` children read the
    variable themselves."""
    study = _node(c, prefix)
    profile_tokens = steps * study.profile.batch_size * (study.profile.seq_len or DEFAULT_SEQ_LEN)
    _shrink(c, f"{prefix}profile.token_budget", profile_tokens, cut)
    _shrink(c, f"{prefix}eval.limit", steps * study.eval.batch_size, cut)


def apply(command: str, c: ml_collections.ConfigDict, steps: int) -> list[str]:
    """Cap `command`'s config `c` (its configs/<command>.py) to `steps` steps in place; what was cut."""
    cut: list[str] = []
    if command == "train":
        _shrink(c, "steps", steps, cut)
        _shrink(c, "data.max_validation", steps * c.batch_size, cut)
        tokens = steps * c.batch_size * (c.data.seq_len or DEFAULT_SEQ_LEN)
        _shrink(c, "profile_tokens", tokens, cut)
    elif command == "profile":
        _shrink(c, "token_budget", steps * c.batch_size * (c.seq_len or DEFAULT_SEQ_LEN), cut)
    elif command == "eval":
        for name in c.tasks:
            _shrink(c, f"tasks.{name}.limit", steps * c.batch_size, cut)
        _shrink(c, "perplexity.limit", steps * c.batch_size, cut)
    elif command == "run":
        for prefix in [f"studies.{n}." for n in c.studies] if "studies" in c else [""]:
            _study(c, prefix, steps, cut)
    return cut


def from_environment(command: str, c: ml_collections.ConfigDict) -> None:
    """Apply ESFT_MAX_STEPS when it is set; ConfigFileError for a value not a whole number >= 1."""
    value = os.environ.get(ENV, "")
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise ConfigFileError(f"{ENV}={value!r}: expected a whole number >= 1 (or unset)")
    cut = apply(command, c, int(value))
    if cut:
        print(f"esft {command}: {ENV}={value}: {', '.join(cut)}", file=sys.stderr)

"""Experiment configs: small Python files with `get_config(arg)`, plus `--config.key=value` overrides.

`load("configs/route.py:tiny", ["batch_size=8", "mesh.expert=4"])` imports the file, calls
`get_config("tiny")` (or `get_config()` without an argument) and applies the overrides, each value
parsed as a Python literal where it is one (`8`, `0.5`, `None`, `'text'`, `True`), else taken as a string.

A path `configs/...` that does not exist relative to the working directory is read from the config
files shipped with esft_jax (`resolve`), so `esft --config configs/train.py` works from any directory.

With a command, `load` first checks that the file is one of that command's configs (`for_command`:
its top-level keys include those of the command's shipped config), so `esft train --config
configs/eval.py` says that the file is for `esft eval`, not which key the train code missed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import ml_collections

from esft_jax.checkpoint.families import family
from esft_jax.errors import UserError
from esft_jax.model.config import ModelConfig

BUNDLED_PREFIX = "configs"  # the first part of a path that names a shipped config file
# each command's shipped config files (under bundled_dir()): a config of the command has their keys
COMMAND_FILES = {
    "route": ("route.py",),
    "profile": ("profile.py",),
    "select": ("select.py",),
    "analyze": ("analyze.py",),
    "train": ("train.py",),
    "export": ("export.py",),
    "eval": ("eval.py",),
    "run": ("experiments/official.py", "experiments/main.py"),  # one study, or several
    "plan": ("plan.py",),
    "data": ("data.py",),
    "serve": ("serve.py",),
}


class ConfigFileError(UserError, ValueError):
    """A config file or override that cannot be applied; the message names the file and key."""


class OpenConfigDict(ml_collections.ConfigDict):
    """A ConfigDict whose keys are the user's (e.g. serve's adapters: name -> directory), so an
    override may add one: `--config.adapters.intent=runs/intent/adapter` (the value as text)."""


def bundled_dir() -> Path:
    """The config files shipped with esft_jax: esft_jax/bundled_configs in an installed wheel
    (pyproject.toml maps the repository's configs/ there), the repository's configs/ in a checkout."""
    package = Path(__file__).parents[1]  # esft_jax
    installed = package / "bundled_configs"
    return installed if installed.is_dir() else package.parent / BUNDLED_PREFIX


def resolve(path: str | Path) -> Path:
    """`path` where it names a file (relative to the working directory); else a `configs/...` path
    inside the shipped config files (bundled_dir), where that file exists; else `path` unchanged."""
    file = Path(path)
    if file.is_file() or file.is_absolute() or file.parts[:1] != (BUNDLED_PREFIX,):
        return file
    bundled = bundled_dir().joinpath(*file.parts[1:])
    return bundled if bundled.is_file() else file


def _module(path: str) -> ModuleType:
    """The config file `path` (see resolve), executed."""
    file = resolve(path)
    if not file.is_file():
        raise ConfigFileError(f"{path}: no such config file")
    module_spec = importlib.util.spec_from_file_location(f"_esft_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigFileError(f"{path}:{e.lineno}: {e.msg}") from None
    if not hasattr(module, "get_config"):
        raise ConfigFileError(f"{path}: defines no get_config()")
    return module


@functools.cache
def presets(path: str) -> tuple[str, ...]:
    """A config file's named variants (its PRESETS; () where it has no fixed set); the file runs
    once a process (a study asks for configs/train.py's for each of its methods)."""
    return tuple(getattr(_module(path), "PRESETS", ()))


def load_file(spec: str) -> ml_collections.ConfigDict:
    """'path.py' or 'path.py:arg' -> the ConfigDict its get_config returns (path: see resolve)."""
    path, _, arg = spec.partition(":")
    module = _module(path)
    # a config file's named variants, where it has a fixed set
    presets = getattr(module, "PRESETS", None)
    if arg and presets is not None and arg not in presets:
        raise ConfigFileError(
            f"{spec}: no preset {arg!r} in {path} (presets: {', '.join(presets)})"
        )
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except (
        Exception
    ) as e:  # a config file is user code: name it and the argument, not its traceback
        raise ConfigFileError(
            f"{spec}: get_config({arg!r}) failed: {type(e).__name__}: {e}"
        ) from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigFileError(
            f"{path}: get_config() returned {type(cfg).__name__}, not a ConfigDict"
        )
    return cfg


def _parse(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(value.lower(), value)


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Sequence[str], source: str = "config"
) -> ml_collections.ConfigDict:
    """Apply 'a.b=value' overrides in place; unknown keys and wrong types are errors."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigFileError(f"--config.{item}: expected --config.KEY=VALUE")
        *parents, leaf = key.split(".")
        node = cfg
        for i, name in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise ConfigFileError(
                    f"--config.{key}: {source} has no key {'.'.join(parents[: i + 1])!r}"
                )
            node = node[name]
        if isinstance(node, OpenConfigDict) and leaf and leaf not in node:
            node[leaf] = raw
            continue
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigFileError(f"--config.{key}: {source} has no key {key!r}")
        value = _parse(raw)
        if isinstance(node[leaf], str) and not isinstance(value, str):
            value = raw  # a string field keeps the text as written
        expected = type(node[leaf]).__name__
        try:
            node[leaf] = value
        except TypeError:
            raise ConfigFileError(
                f"--config.{key}={raw}: expected a value of type {expected}"
            ) from None
    return cfg


@functools.cache
def _keys(bundled: str) -> frozenset[str]:
    """The top-level keys of a shipped config file (bundled_dir()/bundled)."""
    return frozenset(load_file(str(bundled_dir() / bundled)).keys())


def for_command(command: str, spec: str, cfg: ml_collections.ConfigDict) -> None:
    """ConfigFileError unless `cfg` (loaded from `spec`) has the top-level keys of a shipped config of
    `command` (COMMAND_FILES; more keys are fine): the message names the command the file is for
    (the one whose keys it has), or the keys it lacks."""
    path, keys = spec.partition(":")[0], set(cfg.keys())
    own = COMMAND_FILES[command]
    if any(_keys(file) <= keys for file in own):
        return
    fits = [
        (len(_keys(file)), other)
        for other, files in COMMAND_FILES.items()
        for file in files
        if other != command and _keys(file) <= keys
    ]
    if fits:
        raise ConfigFileError(f"{path} is a config for `esft {max(fits)[1]}`, not `esft {command}`")
    nearest = min(own, key=lambda file: len(_keys(file) - keys))
    raise ConfigFileError(
        f"{path}: not a config for `esft {command}`: it lacks "
        f"{', '.join(sorted(_keys(nearest) - keys))} (keys of {BUNDLED_PREFIX}/{nearest})"
    )


def load(
    spec: str, overrides: Sequence[str] = (), command: str | None = None
) -> ml_collections.ConfigDict:
    """The config of `spec` with `overrides` applied; with `command`, checked first to be one of its
    configs (for_command), so a file of another command is named as such, not as unknown keys."""
    cfg = load_file(spec)
    if command is not None:
        for_command(command, spec, cfg)
    return apply_overrides(cfg, overrides, source=spec.partition(":")[0])


def model_config(cd: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig described by a `model` ConfigDict (field names as in ModelConfig), of a
    supported family."""
    cfg = ModelConfig.from_dict(cd.to_dict())
    family(cfg.model_type)
    return cfg

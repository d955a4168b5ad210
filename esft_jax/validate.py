"""Every command's config, checked once, up front, before any work starts or any file is written.

`check(command, c)` raises ConfigFileError naming the first bad `--config.KEY`: a value out of
range, a choice that does not exist, an input that is missing or empty, an output directory that
cannot be written. Checks that need the loaded model or data (seq_len against the model's
positions, a training run's resume rules) live with the code that has them; these need neither.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from esft_jax.builtin.suite import HELD_OUT_DOCS
from esft_jax.checkpoint.output_dir import OutputDirError, export_replaceable
from esft_jax.config_files import ConfigFileError
from esft_jax.data.chat import LOSS_ON, TEMPLATES
from esft_jax.data.sources import FORMATS
from esft_jax.eval.scorers import SCORERS
from esft_jax.model import ModelConfig
from esft_jax.model.config import DTYPES
from esft_jax.routing.profile import COUNT_MODES
from esft_jax.routing.select import METHODS as SELECT_METHODS
from esft_jax.runtime import RANDOM_WEIGHTS, RUNTIME_FIELDS
from esft_jax.serve import names as served_names
from esft_jax.train.method import METHODS as TRAIN_METHODS

SCORES, NORMS = ("token", "gate"), ("pooled", "paper")


def _get(c: ml_collections.ConfigDict, key: str) -> Any:
    for name in key.split("."):
        c = c[name]
    return c


def whole(c: ml_collections.ConfigDict, key: str, minimum: int = 1) -> None:
    value = _get(c, key)
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
    value = _get(c, key)
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


def one_of(c: ml_collections.ConfigDict, key: str, options: Sequence[str]) -> None:
    value = _get(c, key)
    if value not in options:
        raise ConfigFileError(
            f"--config.{key}={value!r}: expected one of {', '.join(map(str, options))}"
        )


def template(c: ml_collections.ConfigDict, key: str) -> None:
    """A chat template choice (data/chat.py): model, esft or an existing .jinja file."""
    value = _get(c, key)
    if value in TEMPLATES:
        return
    if not (isinstance(value, str) and value.endswith(".jinja")):
        raise ConfigFileError(
            f"--config.{key}={value!r}: expected {', '.join(TEMPLATES)} or a path ending in .jinja"
        )
    if not Path(value).is_file():
        raise ConfigFileError(f"--config.{key}={value}: no such file")


def required(c: ml_collections.ConfigDict, key: str, what: str) -> None:
    if not _get(c, key):
        raise ConfigFileError(f"--config.{key}: name {what}")


def input_path(c: ml_collections.ConfigDict, key: str, what: str) -> None:
    """A required input file or directory that exists (and, for a file, is not empty)."""
    required(c, key, what)
    path = Path(_get(c, key))
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
    _writable(f"--config.{key}={_get(c, key)}", Path(_get(c, key)))


def writable_file(c: ml_collections.ConfigDict, key: str) -> None:
    """An output file whose directory can be written."""
    required(c, key, "an output file")
    _writable(f"--config.{key}={_get(c, key)}", Path(_get(c, key)).parent)


DEFAULT_SEQ_LEN = 4096  # the paper's rows (ESFT trains and profiles 4096-token sequences)


def within_positions(c: ml_collections.ConfigDict, key: str, cfg: ModelConfig) -> None:
    """A sequence length the model has positions for (checked once the model's config is read).
    0, the configs' default, is set to DEFAULT_SEQ_LEN, or the model's positions where it has fewer
    (the built-in model: 2048), so a default works on any model."""
    value = _get(c, key)
    if value == 0:
        value = min(DEFAULT_SEQ_LEN, cfg.max_position_embeddings)
        parent, _, leaf = key.rpartition(".")
        (_get(c, parent) if parent else c)[leaf] = value
    if value > cfg.max_position_embeddings:
        raise ConfigFileError(
            f"--config.{key}={value}: longer than the model's {cfg.max_position_embeddings} "
            f"positions (max_position_embeddings)"
        )


def _architecture_override(where: str, key: str, checkpoint: str) -> None:
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
        node = _get(c, ".".join(parents)) if parents else c
        if isinstance(node, ml_collections.ConfigDict):
            _architecture_override(f"--config.{key}", key, node.get("checkpoint", ""))


def _route(c: ml_collections.ConfigDict) -> None:
    for key in ("batch_size", "seq_len", "top_experts"):
        whole(c, key)


def _profile(c: ml_collections.ConfigDict) -> None:
    input_path(c, "data", "a dataset to profile")
    one_of(c, "data_format", FORMATS)
    template(c, "template")
    for key in ("token_budget", "batch_size"):
        whole(c, key)
    whole(c, "seq_len", 0)  # 0: resolved against the model (within_positions)
    whole(c, "shards", 0)
    one_of(c, "count", COUNT_MODES)
    writable_dir(c, "out_dir")


def _selection(c: ml_collections.ConfigDict, prefix: str = "") -> None:
    one_of(c, f"{prefix}score", SCORES)
    one_of(c, f"{prefix}norm", NORMS)
    one_of(c, f"{prefix}method", SELECT_METHODS)
    number(c, f"{prefix}p", 0.0, 1.0, low_open=True)
    whole(c, f"{prefix}group_size")


def _select(c: ml_collections.ConfigDict) -> None:
    input_path(
        c, "stats", "routing statistics (esft profile's out_dir, stats.npz or official logs)"
    )
    _selection(c)
    whole(c, "n")
    if c.decimals is not None:
        whole(c, "decimals", 0)
    writable_file(c, "out")


def _analyze(c: ml_collections.ConfigDict) -> None:
    if not c.tasks:
        raise ConfigFileError("--config.tasks: name at least one task (name=stats_dir)")
    for name in c.tasks:
        input_path(c, f"tasks.{name}", f"task {name}'s routing statistics")
    number(c, "p", 0.0, 1.0, low_open=True)
    writable_dir(c, "out_dir")


def _scoring(c: ml_collections.ConfigDict, key: str, judge: ml_collections.ConfigDict) -> None:
    one_of(c, f"{key}.scorer", ["judge", *SCORERS])
    whole(c, f"{key}.max_new_tokens")
    if _get(c, f"{key}.scorer") == "judge" and not judge.base_url:
        raise ConfigFileError(
            f"--config.{key}.scorer=judge: needs an endpoint (--config.judge.base_url, "
            f"--config.judge.model)"
        )


def _eval(c: ml_collections.ConfigDict) -> None:
    tasks = [name for name, task in c.tasks.items() if task.data]
    if not tasks and not c.perplexity.data:
        raise ConfigFileError(
            "--config.tasks: no task to evaluate (set --config.tasks.NAME.data or "
            "--config.perplexity.data)"
        )
    for name in tasks:
        input_path(c, f"tasks.{name}.data", f"task {name}'s eval set")
        one_of(c, f"tasks.{name}.format", FORMATS)
        _scoring(c, f"tasks.{name}", c.judge)
        whole(c, f"tasks.{name}.limit", 0)
    if c.perplexity.data:
        input_path(c, "perplexity.data", "a held-out dataset")
        one_of(c, "perplexity.format", FORMATS)
        whole(c, "perplexity.seq_len", 2)
        whole(c, "perplexity.limit", 0)
    template(c, "template")
    whole(c, "batch_size")
    writable_dir(c, "out_dir")


def _study(c: ml_collections.ConfigDict) -> None:
    required(c, "checkpoint", "the Hugging Face checkpoint the study fine-tunes")
    for name in c.selections:
        _selection(c, f"selections.{name}.")
    for method in c.methods:
        if method not in ("fft", "lora") and method.removeprefix("esft_") not in c.selections:
            raise ConfigFileError(
                f"--config.methods: {method!r} is neither fft, lora nor esft_<one of "
                f"{', '.join(c.selections)}>"
            )
    for name in [c.task, *c.general_tasks]:
        if name not in c.scoring:
            raise ConfigFileError(f"--config.scoring: no entry for task {name!r}")
        _scoring(c, f"scoring.{name}", c.judge)
    one_of(c, "launch", ("local", "print"))
    one_of(c, "data_format", FORMATS)
    template(c, "template")
    one_of(c, "loss_on", LOSS_ON)
    for override in c.train:  # each `esft train` of the study trains c.checkpoint
        _architecture_override(
            f"--config.train: {override!r}", override.partition("=")[0], c.checkpoint
        )
    for key in (
        "profile.token_budget",
        "profile.seq_len",
        "profile.batch_size",
        "eval.batch_size",
        "eval.seq_len",
    ):
        whole(c, key)
    whole(c, "eval.limit", 0)
    writable_dir(c, "run_dir")


def _run(c: ml_collections.ConfigDict) -> None:
    if "studies" not in c:
        return _study(c)
    writable_dir(c, "run_dir")
    for name, study in c.studies.items():
        try:
            _study(study)
        except ConfigFileError as e:
            raise ConfigFileError(
                str(e).replace("--config.", f"--config.studies.{name}.", 1)
            ) from None


def _export(c: ml_collections.ConfigDict) -> None:
    input_path(c, "checkpoint", "the base checkpoint directory")
    input_path(c, "adapter", "the adapter directory (esft train's <workdir>/adapter)")
    required(c, "out", "the directory to write the merged checkpoint to")
    writable_dir(c, "out")
    one_of(c, "dtype", ("auto", "native", *DTYPES))
    try:  # before the merge: refusing costs nothing (save_checkpoint checks again when it writes)
        export_replaceable(
            Path(c.out),
            c.overwrite,
            (c.checkpoint, c.adapter),
            overwrite_flag="--config.overwrite=True",
        )
    except OutputDirError as e:
        raise ConfigFileError(f"--config.out: {e}") from None


def _data(c: ml_collections.ConfigDict) -> None:
    for key in ("n_train", "n_eval", "n_docs"):
        whole(c, key)
    if c.n_docs > HELD_OUT_DOCS:
        raise ConfigFileError(
            f"--config.n_docs={c.n_docs}: there are {HELD_OUT_DOCS} held-out docs"
        )
    writable_dir(c, "out")
    out = Path(c.out)
    if out.is_dir() and any(out.iterdir()) and not c.overwrite:
        raise ConfigFileError(
            f"--config.out={out}: the directory is not empty (choose another, or "
            f"--config.overwrite=True)"
        )


def _plan(c: ml_collections.ConfigDict) -> None:
    methods = c.methods.split(",")
    for method in methods:
        if method not in TRAIN_METHODS:
            raise ConfigFileError(
                f"--config.methods: {method!r} is not one of {', '.join(TRAIN_METHODS)}"
            )
    one_of(c, "mesh_axis", ("fsdp", "expert"))
    for key in ("batch_size", "lora_rank"):
        whole(c, key)
    whole(c, "micro_batch", 0)
    whole(c, "seq_len", 0)  # 0: resolved against the model (within_positions)
    number(c, "device_memory_gb", 0, low_open=True)
    for n in c.devices:
        if not (isinstance(n, int) and n >= 1):
            raise ConfigFileError(
                f"--config.devices={tuple(c.devices)}: expected whole numbers >= 1"
            )
        rows = n * c.micro_batch if c.micro_batch else n
        if c.mesh_axis == "fsdp" and c.batch_size % rows:
            raise ConfigFileError(
                f"--config.batch_size={c.batch_size}: does not split into micro-batches of "
                f"{rows} rows ({n} devices x --config.micro_batch={c.micro_batch or 'all'})"
            )


def _serve(c: ml_collections.ConfigDict) -> None:
    required(c, "checkpoint", "the base model's Hugging Face checkpoint directory")
    base = served_names.base_name(c.checkpoint)
    for name in c.adapters:
        if (why := served_names.problem(base, name)) is not None:
            raise ConfigFileError(f"--config.adapters.{name}: {why}")
        input_path(
            c, f"adapters.{name}", f"adapter {name}'s directory (esft train's <workdir>/adapter)"
        )
    required(c, "host", "the address to bind (127.0.0.1: this machine only)")
    whole(c, "port", 0)
    if c.port > 65535:
        raise ConfigFileError(f"--config.port={c.port}: expected a port number <= 65535")
    whole(c, "rows")
    whole(c, "max_len", 0)
    whole(c, "max_body_bytes")
    template(c, "template")
    number(c, "monitor.ood_ratio", 0)
    if c.monitor.audit_log:
        writable_file(c, "monitor.audit_log")


CHECKS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "route": _route,
    "profile": _profile,
    "select": _select,
    "analyze": _analyze,
    "eval": _eval,
    "run": _run,
    "export": _export,
    "data": _data,
    "plan": _plan,
    "serve": _serve,
}


def check(command: str, c: ml_collections.ConfigDict) -> None:
    """Raise ConfigFileError for the first bad value of command's config (commands without
    checks here: none needed beyond their own)."""
    if command in CHECKS:
        CHECKS[command](c)

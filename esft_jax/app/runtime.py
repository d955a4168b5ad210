"""What every command builds from its config: the model, its tokenizer, the device mesh.

Config fields read: `checkpoint` (a Hugging Face directory, or "random" for random weights of `model`:
asked for by name, so that a forgotten --config.checkpoint is an error, not a random model),
`model` (model fields; with a checkpoint only the runtime fields (RUNTIME_FIELDS) apply, and an
override of another is refused: checks.model_overrides, config_blocks.py), `seed`,
`tokenizer` (a directory with tokenizer.json), `mesh` (axis sizes over all processes' devices),
`distributed` (multi-process runs).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import ml_collections
from jax.sharding import Mesh
from tokenizers import Tokenizer

from esft_jax import sharding
from esft_jax.app import config_files
from esft_jax.checkpoint import CheckpointError, load_checkpoint, load_config, load_tokenizer
from esft_jax.checkpoint.adapter import CONFIG_FILE, load_with_adapter
from esft_jax.checkpoint.fingerprint import (
    base_metadata,
    check_base,
    checkpoint_fingerprint,
    random_fingerprint,
)
from esft_jax.checkpoint.hf_names import config_to_hf
from esft_jax.checkpoint.sharded_load import load_params_sharded
from esft_jax.data import tokenize
from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.data.chat import ChatTemplate
from esft_jax.jsonio import read_json
from esft_jax.model import ModelConfig, init_params, param_axes
from esft_jax.model.params import flat_param_specs

RUNTIME_FIELDS = (
    "dtype",
    "moe_strategy",
    "capacity_factor",
    "expert_parallel",
    "scan_layers",
    "remat",
    "attention_impl",
    "attention_block",
    "frozen_dtype",
    "router_grad",
)
RANDOM_WEIGHTS = "random"  # --config.checkpoint=random: seeded random weights of c.model


def _runtime_overrides(c: ml_collections.ConfigDict) -> dict:
    """The runtime fields of c.model, which apply to a checkpoint's model too."""
    if not c.checkpoint:
        raise config_files.ConfigFileError(
            f"--config.checkpoint: name a Hugging Face checkpoint directory "
            f"(or --config.checkpoint={RANDOM_WEIGHTS} for random weights of --config.model)"
        )
    return {k: c.model[k] for k in RUNTIME_FIELDS if k in c.model}


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
    """The config of the model load_model(c) loads, without reading any weights (to check a run's
    values against it before the expensive part)."""
    overrides = _runtime_overrides(c)
    return (
        config_files.model_config(c.model)
        if c.checkpoint == RANDOM_WEIGHTS
        else load_config(c.checkpoint, **overrides)
    )


def load_model(c: ml_collections.ConfigDict, mesh: Mesh | None = None) -> tuple[ModelConfig, dict]:
    """From `c.checkpoint` (plus `c.adapter`, where the config has one), or random weights for
    `c.model` (seeded by c.seed) when it is "random"; the one place weights are put on devices:
    sharded by their logical axes over `mesh` (a checkpoint read straight onto it,
    checkpoint/sharded_load.py: each process reads only the blocks its devices hold), else on the
    default device."""
    overrides = _runtime_overrides(c)
    if c.get("adapter") and c.checkpoint == RANDOM_WEIGHTS:
        raise config_files.ConfigFileError(
            f"--config.adapter={c.adapter}: applies to a checkpoint, not to random weights"
        )
    if c.get("adapter"):
        check_adapter_base(c, c.adapter)
    if mesh is not None:
        _check_fits(model_config(c), mesh)
    if c.checkpoint != RANDOM_WEIGHTS and mesh is not None:
        cfg = load_config(c.checkpoint, **overrides)
        return cfg, load_params_sharded(c.checkpoint, cfg, mesh, adapter=c.get("adapter") or None)
    if c.checkpoint == RANDOM_WEIGHTS:
        cfg = config_files.model_config(c.model)
        params = init_params(cfg, jax.random.key(c.seed))  # on one device, as without a mesh
    elif c.get("adapter"):
        cfg, params = load_with_adapter(c.checkpoint, c.adapter, **overrides)
    else:
        cfg, params = load_checkpoint(c.checkpoint, **overrides)
    if mesh is None:
        return cfg, jax.tree.map(jax.numpy.asarray, params)
    return cfg, sharding.shard_params(params, param_axes(cfg), mesh)


def base_fingerprint(c: ml_collections.ConfigDict) -> str:
    """The fingerprint of the base weights c names (checkpoint/fingerprint.py)."""
    if c.checkpoint == RANDOM_WEIGHTS:
        return random_fingerprint(config_to_hf(model_config(c)), c.seed)
    return checkpoint_fingerprint(c.checkpoint)


def adapter_base(c: ml_collections.ConfigDict) -> dict[str, str]:
    """What an adapter trained from c's base records of it (adapter_config.json entries)."""
    return base_metadata(c.checkpoint, base_fingerprint(c))


def check_adapter_base(c: ml_collections.ConfigDict, adapter_dir: str | Path) -> None:
    """Refuse (one line) an adapter trained on another base than c's, unless
    c.allow_other_base; reads only the adapter's config and the base's headers."""
    path = Path(adapter_dir) / CONFIG_FILE
    metadata = read_json(path, CheckpointError, f"no such file (is {adapter_dir} an adapter?)")
    if isinstance(metadata, dict):  # else read_adapter's own message, when the adapter is read
        fingerprint = base_fingerprint(c)
        check_base(path, metadata, fingerprint, c.checkpoint, c.get("allow_other_base", False))


def _check_fits(cfg: ModelConfig, mesh: Mesh) -> None:
    """Every parameter splits evenly over the mesh axes its logical axes map to (before any reading)."""
    for path, spec in flat_param_specs(cfg).items():
        bad = sharding.indivisible(spec.shape, spec.axes, dict(mesh.shape))
        if bad:
            axis, size, i = bad
            raise config_files.ConfigFileError(
                f"--config.mesh.{axis}={size}: does not divide {'/'.join(path)}'s "
                f"{spec.axes[i]} axis of {spec.shape[i]}"
            )


def tokenizer(c: ml_collections.ConfigDict) -> Tokenizer:
    """c.tokenizer's, else the checkpoint's, else the byte tokenizer (the tiny random model's)."""
    if c.tokenizer or c.checkpoint != RANDOM_WEIGHTS:
        return load_tokenizer(c.tokenizer or c.checkpoint)
    return byte_tokenizer()


def chat_template(
    c: ml_collections.ConfigDict, key: str, tokenizer: Tokenizer, cfg: ModelConfig
) -> ChatTemplate:
    """The chat template `--config.KEY` chooses ("model", "esft" or a .jinja file: data/chat.py)
    for c's tokenizer; "model" reads c.tokenizer's, else the checkpoint's, template files."""
    choice = c
    for name in key.split("."):
        choice = choice[name]
    directory = c.tokenizer or (c.checkpoint if c.checkpoint != RANDOM_WEIGHTS else None)
    return tokenize.chat_template(tokenizer, cfg, choice, directory, f"--config.{key}")


def distributed(c: ml_collections.ConfigDict) -> None:
    """Join a multi-process run (JAX's multi-controller runtime) if `c.distributed` asks for one:
    num_processes > 1 with a coordinator "host:port" and this process's id, or -1 to let JAX find
    them (TPU pod slices, SLURM / Open MPI clusters). Call before any computation. CPU processes
    talk through gloo."""
    d = c.get("distributed")
    if d is None or d.num_processes == 1 or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if d.num_processes == -1:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(d.coordinator, d.num_processes, d.process_id)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM of /proc/self/status, which starts afresh
    at exec; getrusage's ru_maxrss does not, so a child started by a large parent would report the
    parent's peak. Elsewhere: ru_maxrss (bytes on macOS)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
        * 1024
    )


def mesh(c: ml_collections.ConfigDict) -> Mesh | None:
    """The mesh of c.mesh's axis sizes over the first devices; None for a single device."""
    shape = dict(c.mesh)
    for axis, size in shape.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise config_files.ConfigFileError(
                f"--config.mesh.{axis}={size!r}: expected a whole number >= 1"
            )
    n = math.prod(shape.values())
    if n > jax.device_count() or (jax.process_count() > 1 and n != jax.device_count()):
        sizes = " x ".join(f"{axis} {size}" for axis, size in shape.items() if size > 1)
        raise config_files.ConfigFileError(
            f"--config.mesh: {sizes} needs {n} devices; this run has {jax.device_count()} "
            f"({jax.default_backend()}, {jax.process_count()} process(es)); "
            "a multi-process mesh spans them all"
        )
    return sharding.make_mesh(shape, jax.devices()[:n]) if n > 1 else None

"""The training values, checked once, up front, before `esft train` writes anything.

`check_with_model(c, cfg)` runs once the model's config is read (the sequence length is checked
against the model's positions); each bad value is one ConfigFileError naming its `--config.KEY` (the checks of
app/checks.py), so a bad command fails at once, not deep in the data pipeline or orbax.
"""

from __future__ import annotations

import ml_collections

from esft_jax.app import checks
from esft_jax.app.config_files import ConfigFileError
from esft_jax.data.chat import LOSS_ON
from esft_jax.data.sources import FORMATS
from esft_jax.model import ModelConfig
from esft_jax.train.method import METHODS, SELECTED_EXPERTS

AT_LEAST_ONE = (
    "steps",
    "batch_size",
    "grad_accum",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
)


def check_with_model(c: ml_collections.ConfigDict, cfg: ModelConfig) -> None:
    """Raise ConfigFileError for the first value of `c` (configs/train.py) that cannot train `cfg`."""
    checks.one_of(c, "method", METHODS)
    if c.method in SELECTED_EXPERTS:
        checks.required(c, "expert_config", "the expert config to train (esft select writes one)")
    for key in AT_LEAST_ONE:
        checks.whole(c, key)
    checks.whole(c, "data.seq_len", minimum=0)
    checks.within_positions(c, "data.seq_len", cfg)  # 0: the default length for cfg
    checks.number(c, "optim.lr", 0)
    checks.whole(c, "optim.warmup_steps", minimum=0)
    checks.whole(c, "profile_tokens", minimum=0)
    checks.whole(c, "data.limit", minimum=0)
    checks.number(c, "data.general_ratio", 0)
    checks.number(c, "data.validation_fraction", 0, 0.5)
    if not isinstance(c.extend, bool):
        raise ConfigFileError(f"--config.extend={c.extend!r}: expected True or False")
    checks.input_path(c, "data.train", "a training set")
    checks.one_of(c, "data.format", FORMATS)
    checks.template(c, "data.template")
    checks.one_of(c, "data.loss_on", LOSS_ON)
    if c.data.general:
        checks.input_path(c, "data.general", "a general dataset")

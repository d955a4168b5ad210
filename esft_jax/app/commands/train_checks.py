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
from esft_jax.expert_config import ExpertConfig
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
    checks.boolean(c, "extend")
    checks.input_path(c, "data.train", "a training set")
    checks.one_of(c, "data.format", FORMATS)
    checks.template(c, "data.template")
    checks.one_of(c, "data.loss_on", LOSS_ON)
    if c.data.general:
        checks.input_path(c, "data.general", "a general dataset")
    _router_grad(c, cfg)


ROUTER_TRAINING = ("router", "fft")  # and esft with the expert config's non_expert_modules


def _router_grad(c: ml_collections.ConfigDict, cfg: ModelConfig) -> None:
    """The router's gradient from the dense mixture (densemixer, or model.router_grad=dense) only
    for a method that trains the router."""
    checks.boolean(c, "densemixer")
    key = "densemixer=True" if c.densemixer else f"model.router_grad={cfg.router_grad}"
    if not (c.densemixer or cfg.router_grad == "dense") or c.method in ROUTER_TRAINING:
        return
    why = ""
    if c.method == "esft":
        layers, n_experts = cfg.moe_layer_ids, cfg.n_routed_experts
        if ExpertConfig.load(c.expert_config, layers, n_experts).non_expert_modules:
            return
        why = f" ({c.expert_config}: non_expert_modules false)"
    raise ConfigFileError(
        f"--config.{key}: method {c.method} does not train the router{why}; a dense router "
        f"gradient needs {', '.join(ROUTER_TRAINING)} or esft with non_expert_modules"
    )

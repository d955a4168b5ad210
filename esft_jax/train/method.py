"""The training-method protocol, the one factory (a method's name and its settings), and the
adapter a run leaves.

A method splits the model into frozen params and a compact trainable pytree, so one train loop
(app/commands/train.py) and one memory planner (train/plan.py) serve every method. A new method is one module
with a class following `TrainingMethod` and one `REGISTRY` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from esft_jax.checkpoint.adapter import write_adapter
from esft_jax.expert_config import ExpertConfig
from esft_jax.model.config import ConfigError, ModelConfig
from esft_jax.train.esft import ExpertSubset
from esft_jax.train.esft_lora import ExpertLoRA
from esft_jax.train.fft import FullFineTune
from esft_jax.train.lora import LoRA
from esft_jax.train.router_only import RouterOnly
from esft_jax.train.settings import MethodSettings
from esft_jax.train.trainable import Params


class TrainingMethod(Protocol):
    """What trains, as pure functions over pytrees (frozen: the params as loaded)."""

    @property
    def expert_config(self) -> ExpertConfig | None:
        """The experts an ESFT run trains (its resume check and run files); None for other methods."""

    def init(self, frozen: Params) -> Params:
        """The trainable pytree (float32 master copies), and nothing else: optimizer state exists only
        for it."""

    def materialize(self, frozen: Params, trainable: Params) -> Params:
        """The params the forward pass sees. Frozen leaves enter as constants, so no weight gradient is
        ever computed for them."""

    def num_trained(self, trainable: Params) -> int:
        """The values that train (the run summary's trainable_params): an ESFT run's unused slots are
        not counted."""

    def axes(self, model_axes: Params, trainable: Params) -> Params:
        """Logical axis names of the trainable leaves (param_axes' names: sharded like the model)."""

    def write_back(self, frozen: Params, trainable: Params) -> Params:
        """Full params in the frozen dtypes (checkpoints, export)."""

    def adapter_tensors(
        self, cfg: ModelConfig, frozen: Params, trainable: Params
    ) -> tuple[dict[str, np.ndarray], dict]:
        """(the tensors the method changed by HF name, in checkpoint/adapter.py's format; the adapter
        metadata, "method" included). Gathers to the host: every process of a run calls it."""


Constructor = Callable[[MethodSettings, ModelConfig], TrainingMethod]
REGISTRY: dict[str, Constructor] = {
    "esft": ExpertSubset.from_settings,
    "fft": FullFineTune.from_settings,
    "lora": LoRA.from_settings,
    "router": RouterOnly.from_settings,
    "esft_lora": ExpertLoRA.from_settings,
}
METHODS = tuple(REGISTRY)  # the values of --config.method
# methods that train the experts an expert config selects (esft train needs its file; a study
# names them <method>_<selection>)
SELECTED_EXPERTS = ("esft", "esft_lora")
# methods whose trained copy covers the whole routed-expert stack (no quantised experts: model/quant.py)
WHOLE_EXPERT_STACK = ("fft", "lora")


def build_method(name: str, settings: MethodSettings, cfg: ModelConfig) -> TrainingMethod:
    """The method `name` (a REGISTRY key), built from `settings`."""
    if name not in REGISTRY:
        raise ValueError(f"method={name!r}: expected one of {METHODS}")
    if cfg.expert_scheme is not None and name in WHOLE_EXPERT_STACK:
        raise ConfigError(
            f"method={name} trains every routed expert: it needs them unquantised, not "
            f"{cfg.expert_scheme.label} (model.frozen_dtype=bfloat16)"
        )
    return REGISTRY[name](settings, cfg)


def save_adapter(
    out_dir: str | Path,
    cfg: ModelConfig,
    method: TrainingMethod,
    frozen: Params,
    trainable: Params,
    write: bool = True,
    extra: dict | None = None,
) -> Path:
    """Write the method's adapter, its config updated with `extra` (the base it was trained on:
    checkpoint/fingerprint.py; a `routing_profile` (train/routing_profile.py) in place of the
    selection's). In a multi-process run every process calls this (gathering is collective) and
    the one with write=True writes."""
    tensors, metadata = method.adapter_tensors(cfg, frozen, trainable)
    return (
        write_adapter(out_dir, tensors, {**metadata, **(extra or {}), "model_type": cfg.model_type})
        if write
        else Path(out_dir)
    )

"""Router-only tuning (Router Lens / CEFT style): only the MoE routers train, every expert and every
other module stays frozen.

The trainable pytree is the routers as the params stack them: {"router": [L, d, E]} and, where the
model has a router logit bias, "router_bias" [L, E] (L: the MoE layers). The noaux_tc choice
correction (`router_correction`) is a load-balancing buffer, not a weight of the loss: never trained.
"""

from __future__ import annotations

import dataclasses

from esft_jax.checkpoint.hf_names import TensorMap
from esft_jax.model.config import ModelConfig
from esft_jax.train.settings import MethodSettings
from esft_jax.train.trainable import (
    Params,
    cast_like,
    float32_copy,
    hf_tensors,
    overlay,
    tree_size,
)

ROUTER = ("router", "router_bias")  # the router weight and its logit bias, under moe_layers/moe


def _routers(moe: Params) -> Params:
    return {k: moe[k] for k in ROUTER if k in moe}


def is_router(m: TensorMap) -> bool:
    return len(m.path) == 3 and m.path[:2] == ("moe_layers", "moe") and m.path[2] in ROUTER


@dataclasses.dataclass(frozen=True)
class RouterOnly:
    """The routers of every MoE layer train; nothing else."""

    expert_config = None  # not an ESFT run

    @classmethod
    def from_settings(cls, s: MethodSettings, cfg: ModelConfig) -> RouterOnly:
        return cls()

    def init(self, frozen: Params) -> Params:
        return float32_copy(_routers(frozen["moe_layers"]["moe"]))

    def num_trained(self, trainable: Params) -> int:
        return tree_size(trainable)

    def axes(self, model_axes: Params, trainable: Params) -> Params:
        """Sharded like the model's routers."""
        return _routers(model_axes["moe_layers"]["moe"])

    def materialize(self, frozen: Params, trainable: Params) -> Params:
        return overlay(frozen, {"moe_layers": {"moe": trainable}})

    def write_back(self, frozen: Params, trainable: Params) -> Params:
        return cast_like(self.materialize(frozen, trainable), frozen)

    def adapter_tensors(
        self, cfg: ModelConfig, frozen: Params, trainable: Params
    ) -> tuple[dict, dict]:
        """The whole router tensors (and router biases) of every MoE layer."""
        return hf_tensors(cfg, self.write_back(frozen, trainable), is_router), {"method": "router"}

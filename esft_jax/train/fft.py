"""FFT: every parameter trains (the baseline ESFT is measured against)."""

from __future__ import annotations

import dataclasses

from esft_jax.model.config import ModelConfig
from esft_jax.train.settings import MethodSettings
from esft_jax.train.trainable import Params, cast_like, float32_copy, hf_tensors, tree_size


@dataclasses.dataclass(frozen=True)
class FullFineTune:
    """FFT: every parameter trains."""

    expert_config = None  # not an ESFT run

    @classmethod
    def from_settings(cls, s: MethodSettings, cfg: ModelConfig) -> FullFineTune:
        return cls()

    def init(self, frozen: Params) -> Params:
        return float32_copy(frozen)

    def materialize(self, frozen: Params, trainable: Params) -> Params:
        return trainable

    def num_trained(self, trainable: Params) -> int:
        return tree_size(trainable)

    def axes(self, model_axes: Params, trainable: Params) -> Params:
        """Logical axis names of the trainable leaves (for sharding them like the model)."""
        return model_axes

    def write_back(self, frozen: Params, trainable: Params) -> Params:
        return cast_like(trainable, frozen)

    def adapter_tensors(
        self, cfg: ModelConfig, frozen: Params, trainable: Params
    ) -> tuple[dict, dict]:
        """Every tensor of the model."""
        return hf_tensors(cfg, self.write_back(frozen, trainable), lambda m: True), {
            "method": "fft"
        }

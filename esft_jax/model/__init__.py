"""DeepSeek-V2/V3 MoE decoder as pure functions over a parameter pytree."""

from esft_jax.model.config import ConfigError, ModelConfig
from esft_jax.model.params import abstract_params, init_params, param_axes, param_specs
from esft_jax.model.transformer import Routing, forward, segment_positions

__all__ = ["ConfigError", "ModelConfig", "Routing", "abstract_params", "forward", "init_params",
           "param_axes", "param_specs", "segment_positions"]

"""Mixture-of-Experts decoders (every supported family) as pure functions over a parameter pytree."""

from esft_jax.model.config import ConfigError, ModelConfig
from esft_jax.model.params import abstract_params, init_params, param_axes, param_specs
from esft_jax.model.transformer import (
    KVCache,
    Routing,
    forward,
    forward_cached,
    init_cache,
    lm_head,
    segment_positions,
)

__all__ = [
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "Routing",
    "abstract_params",
    "forward",
    "forward_cached",
    "init_cache",
    "init_params",
    "lm_head",
    "param_axes",
    "param_specs",
    "segment_positions",
]

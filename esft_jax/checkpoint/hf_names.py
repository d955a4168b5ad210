"""How our parameter pytree maps onto Hugging Face tensor names, for any family (checkpoint/families).

Canonical names hold one tensor per routed expert (`model.layers.{l}.mlp.experts.{e}.gate_proj.weight`)
and store linear weights as [out, in]; we stack experts and layers and store [in, ...out]. Each
`TensorMap` says where one HF tensor lives in our pytree and how to convert it. Fused file layouts
are converted to and from these names when files are read and written (checkpoint/hf.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from esft_jax.checkpoint import fp8
from esft_jax.checkpoint.families import family
from esft_jax.model.config import ConfigError, ModelConfig
from esft_jax.model.params import flat_param_specs, input_dims

# The quantisations read (dequantised on load: checkpoint/fp8.py, checkpoint/mxfp4.py).
QUANT_METHODS = ("fp8", "mxfp4")
_TOP = {
    ("embed",): "model.embed_tokens.weight",
    ("final_norm",): "model.norm.weight",
    ("lm_head",): "lm_head.weight",
}


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf_name: str
    path: tuple[str, ...]  # key path into our params
    index: tuple[int, ...]  # position inside the stacked array: (layer,) or (layer, expert)
    shape: tuple[int, ...]  # our shape of this slice
    # leading input dims of a linear weight; 0: copied as is; None: a vector, flattened
    n_in: int | None

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.n_in is None:
            return (math.prod(self.shape),)
        if self.n_in == 0:
            return self.shape
        return (math.prod(self.shape[self.n_in :]), math.prod(self.shape[: self.n_in]))

    def from_hf(self, hf: np.ndarray) -> np.ndarray:
        return hf.reshape(self.shape) if not self.n_in else hf.T.reshape(self.shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if not self.n_in:
            return np.ascontiguousarray(ours).reshape(self.hf_shape)
        return np.ascontiguousarray(ours.reshape(self.hf_shape[::-1]).T)


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every HF tensor of the model under its canonical name, in a stable order (layer by layer)."""
    names = family(cfg.model_type).names
    layer_ids = {"dense_layers": cfg.dense_layer_ids, "moe_layers": cfg.moe_layer_ids}
    maps: list[TensorMap] = []
    # quantised weights: their matrices' shapes (the scales are read with them: checkpoint/native.py)
    for path, spec in flat_param_specs(cfg.unquantized()).items():
        if path in _TOP:
            maps.append(TensorMap(_TOP[path], path, (), spec.shape, input_dims(path)))
            continue
        group, rest = path[0], path[1:]
        suffix = names[rest]
        per_expert = rest[:2] == ("moe", "experts")
        inner = spec.shape[2:] if per_expert else spec.shape[1:]
        for i, layer in enumerate(layer_ids[group]):
            prefix = f"model.layers.{layer}."
            if per_expert:
                maps += [
                    TensorMap(prefix + suffix.format(e=e), path, (i, e), inner, input_dims(path))
                    for e in range(spec.shape[1])
                ]
            else:
                maps.append(TensorMap(prefix + suffix, path, (i,), inner, input_dims(path)))
    return sorted(maps, key=lambda m: _layer_of(m.hf_name))


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


def config_from_hf(hf: Mapping[str, Any], **runtime: Any) -> ModelConfig:
    """ModelConfig from a config.json dict of any supported family; `runtime` sets dtype/strategy fields.
    A `quantization_config` other than QUANT_METHODS' is refused (ConfigError)."""
    _check_quantization(hf.get("quantization_config"))
    return ModelConfig(**{**family(hf.get("model_type")).from_hf(hf), **runtime})


def _check_quantization(quant: Any) -> None:
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, Mapping) else None
    if method not in QUANT_METHODS:
        raise ConfigError(
            f"quantization_config has quant_method {method!r}, which esft cannot read (it reads "
            f"unquantised weights and {' or '.join(QUANT_METHODS)}): dequantise the checkpoint "
            "to bf16 first"
        )
    if method == "fp8":
        fp8.block_size(quant)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers 5 `config.json` dict for this model (of unquantised weights: whatever the
    checkpoint it was read from held, no quantization_config)."""
    return family(cfg.model_type).to_hf(cfg)

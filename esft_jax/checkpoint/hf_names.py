"""How our parameter pytree maps onto Hugging Face tensor names (DeepSeek-V2/V3 layout).

Hub checkpoints hold one tensor per routed expert (`model.layers.{l}.mlp.experts.{e}.gate_proj.weight`)
and store linear weights as [out, in]; we stack experts and layers and store [in, ...out]. Each
`TensorMap` says where one HF tensor lives in our pytree and how to convert it.
"""

from __future__ import annotations

import dataclasses
import math
import numpy as np

from esft_jax.model.config import ModelConfig
from esft_jax.model.params import flat_param_specs

# our path -> (HF suffix, number of leading input dims; None: copied as is)
_TOP = {("embed",): ("model.embed_tokens.weight", None),
        ("final_norm",): ("model.norm.weight", None),
        ("lm_head",): ("lm_head.weight", 1)}
_LAYER = {
    ("attn_norm",): ("input_layernorm.weight", None),
    ("mlp_norm",): ("post_attention_layernorm.weight", None),
    ("attn", "q"): ("self_attn.q_proj.weight", 1),
    ("attn", "q_a"): ("self_attn.q_a_proj.weight", 1),
    ("attn", "q_a_norm"): ("self_attn.q_a_layernorm.weight", None),
    ("attn", "q_b"): ("self_attn.q_b_proj.weight", 1),
    ("attn", "kv_a"): ("self_attn.kv_a_proj_with_mqa.weight", 1),
    ("attn", "kv_a_norm"): ("self_attn.kv_a_layernorm.weight", None),
    ("attn", "kv_b"): ("self_attn.kv_b_proj.weight", 1),
    ("attn", "o"): ("self_attn.o_proj.weight", 2),
    ("mlp", "gate"): ("mlp.gate_proj.weight", 1),
    ("mlp", "up"): ("mlp.up_proj.weight", 1),
    ("mlp", "down"): ("mlp.down_proj.weight", 1),
    ("moe", "router"): ("mlp.gate.weight", 1),
    ("moe", "router_bias"): ("mlp.gate.e_score_correction_bias", None),
    ("moe", "shared", "gate"): ("mlp.shared_experts.gate_proj.weight", 1),
    ("moe", "shared", "up"): ("mlp.shared_experts.up_proj.weight", 1),
    ("moe", "shared", "down"): ("mlp.shared_experts.down_proj.weight", 1),
    ("moe", "experts", "gate"): ("mlp.experts.{e}.gate_proj.weight", 1),
    ("moe", "experts", "up"): ("mlp.experts.{e}.up_proj.weight", 1),
    ("moe", "experts", "down"): ("mlp.experts.{e}.down_proj.weight", 1),
}


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf_name: str
    path: tuple[str, ...]  # key path into our params
    index: tuple[int, ...]  # position inside the stacked array: (layer,) or (layer, expert)
    shape: tuple[int, ...]  # our shape of this slice
    n_in: int | None  # leading input dims of a linear weight; None: no conversion

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.n_in is None:
            return self.shape
        return (math.prod(self.shape[self.n_in:]), math.prod(self.shape[:self.n_in]))

    def from_hf(self, hf: np.ndarray) -> np.ndarray:
        return hf if self.n_in is None else hf.T.reshape(self.shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.n_in is None:
            return np.ascontiguousarray(ours)
        return np.ascontiguousarray(ours.reshape(self.hf_shape[::-1]).T)


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every HF tensor of the model, in a stable order (layer by layer, as HF writes them)."""
    maps: list[TensorMap] = []
    for path, spec in flat_param_specs(cfg).items():
        if path in _TOP:
            name, n_in = _TOP[path]
            maps.append(TensorMap(name, path, (), spec.shape, n_in))
            continue
        group, rest = path[0], path[1:]
        suffix, n_in = _LAYER[rest]
        first = 0 if group == "dense_layers" else cfg.first_k_dense_replace
        per_expert = "experts" in rest
        inner = spec.shape[2:] if per_expert else spec.shape[1:]
        for i in range(spec.shape[0]):
            prefix = f"model.layers.{first + i}."
            if per_expert:
                maps += [TensorMap(prefix + suffix.format(e=e), path, (i, e), inner, n_in)
                         for e in range(spec.shape[1])]
            else:
                maps.append(TensorMap(prefix + suffix, path, (i,), inner, n_in))
    return sorted(maps, key=lambda m: _layer_of(m.hf_name))


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


def input_dims(layer_path: tuple[str, ...]) -> int | None:
    """How many leading dims of a per-layer weight (e.g. ("attn", "o")) are its inputs; None: not a
    linear weight."""
    return _LAYER[layer_path][1]

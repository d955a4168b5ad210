"""ESFT-LoRA (MoE-Sieve, arXiv 2603.24044): LoRA factors on the selected routed experts only.

The experts of an expert config (any selection rule's, read as ESFT reads it) get, per expert
matrix, A [L, S, in, r] and B [L, S, r, out] over ESFT's override slots (train/esft.py:
ExpertSubset; S the largest per-layer count); every other parameter stays frozen. The forward pass
sees the selected experts as the model's expert overrides (model/moe.py), built each step as their
frozen rows + (alpha / r) A @ B: only those S rows per layer are gathered (quantised experts
dequantised) and held in float32, never the whole stack. A starts normal (std 1/sqrt(in)) in the
used slots and zero in the unused ones, B zero (train/lora.py), so training starts from the base
model, and an unused slot's factors stay exactly zero (no gradient reaches it, and weight decay
keeps a zero zero). The adapter holds the selected experts' factors under their HF names (PEFT's
lora_A / lora_B), merged when loaded or exported (checkpoint/adapter.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.checkpoint.hf_names import tensor_maps
from esft_jax.expert_config import ExpertConfig, ExpertConfigError
from esft_jax.model.config import ModelConfig
from esft_jax.model.params import input_dims
from esft_jax.sharding import to_host
from esft_jax.train.esft import ExpertSubset
from esft_jax.train.lora import factor_tensors, init_factors, merge, split_dims
from esft_jax.train.settings import MethodSettings
from esft_jax.train.trainable import Params

EXPERTS = ("moe_layers", "moe", "experts")


def _experts(params: Params) -> Params:
    return params["moe_layers"]["moe"]["experts"]


@dataclasses.dataclass(frozen=True, eq=False)
class ExpertLoRA:
    """LoRA on the selected routed experts' matrices; trainable {matrix: {"a", "b"}}."""

    subset: ExpertSubset  # the selected experts and their override slots
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0  # the A factors' initialisation

    @classmethod
    def from_settings(cls, s: MethodSettings, cfg: ModelConfig) -> ExpertLoRA:
        """The experts of the file `s.expert_config` (without one, as ESFT plans: the first
        round(s.expert_fraction * E) of every MoE layer); refused if it also asks for the shared
        experts or the non-expert modules, which only method=esft trains."""
        subset = ExpertSubset.from_settings(s, cfg)
        ec = subset.expert_config
        if ec.shared_experts or ec.non_expert_modules:
            raise ExpertConfigError(
                f"{s.expert_config}: shared_experts / non_expert_modules is true, but method="
                "esft_lora trains LoRA factors of the selected routed experts only (method=esft "
                "trains those modules)"
            )
        return cls(subset, s.lora_rank, s.lora_alpha, s.seed)

    @property
    def expert_config(self) -> ExpertConfig:
        return self.subset.expert_config

    def init(self, frozen: Params) -> Params:
        rows = jax.eval_shape(self.subset.slot_rows, _experts(frozen))  # [L, S, ...], unquantised
        names = [k for k in rows if input_dims((*EXPERTS, k)) is not None]  # no biases
        keys = jax.random.split(jax.random.key(self.seed), len(names))
        used = jnp.asarray(self.subset.slot_ids >= 0)[:, :, None, None]
        trainable = {}
        for k, key in zip(names, keys):
            batch, n_in, n_out = split_dims((*EXPERTS, k), rows[k].shape, 2)
            ab = init_factors(key, batch, n_in, n_out, self.rank)
            trainable[k] = {"a": jnp.where(used, ab["a"], 0.0), "b": ab["b"]}
        return trainable

    def num_trained(self, trainable: Params) -> int:
        """r * (in + out) per matrix of each selected expert (the unused slots not counted)."""
        per_slot = sum(math.prod(f.shape[2:]) for ab in trainable.values() for f in ab.values())
        return len(self.subset.rows) * per_slot

    def axes(self, model_axes: Params, trainable: Params) -> Params:
        return jax.tree.map(lambda x: (None,) * x.ndim, trainable)  # small: replicated

    def _rows(self, frozen: Params, trainable: Params) -> Params:
        """Every expert leaf's slot rows [L, S, ...] in float32, the trained matrices' with
        (alpha / r) A @ B added."""
        scale = self.alpha / self.rank
        return {
            k: merge(w, trainable[k], scale) if k in trainable else w.astype(jnp.float32)
            for k, w in self.subset.slot_rows(_experts(frozen)).items()
        }

    def materialize(self, frozen: Params, trainable: Params) -> Params:
        return self.subset.with_override(frozen, self._rows(frozen, trainable))

    def write_back(self, frozen: Params, trainable: Params) -> Params:
        """The frozen params with the selected experts' matrices merged (biases as they were)."""
        rows = self._rows(frozen, trainable)
        return self.subset.write_rows(frozen, {k: rows[k] for k in trainable})

    def adapter_tensors(
        self, cfg: ModelConfig, frozen: Params, trainable: Params
    ) -> tuple[dict[str, np.ndarray], dict]:
        """The factors of the selected experts' matrices (lora_A [r, in], lora_B [out, r] per HF
        tensor); the metadata holds r, lora_alpha and the selection (as ESFT's adapter does)."""
        host, slot, tensors = to_host(trainable), self.subset.slot_of(), {}
        for m in tensor_maps(cfg):
            if m.path[:3] == EXPERTS and m.path[3] in host and m.index in slot:
                ab, at = host[m.path[3]], (m.index[0], slot[m.index])
                tensors.update(factor_tensors(m.hf_name, ab["a"][at], ab["b"][at]))
        metadata = {"method": "esft_lora", "r": self.rank, "lora_alpha": self.alpha}
        return tensors, {**metadata, **self.subset.selection_metadata()}

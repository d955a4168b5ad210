"""ESFT: the selected routed experts train (+ the shared experts / non-expert modules if flagged).

ESFT keeps the selected experts' rows (weights and, where the experts have them, biases) in the
layout of the model's per-layer expert overrides (model/moe.py): [L, S, d, f], S the largest
per-layer count, a layer's unused slots (id -1) zero. The train step differentiates that array as it
is: no gather into the overrides, no scatter of their gradient back, one gradient of its size. The
unused slots get no gradient (model/moe.py masks it), so their Adam moments and weights stay exactly
zero; the adapter holds only the selected experts' tensors. The price: where the layers' counts differ,
the optimizer state covers L * S slots rather than the selected experts.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from esft_jax.checkpoint.hf_names import TensorMap, tensor_maps
from esft_jax.expert_config import ExpertConfig
from esft_jax.model import quant
from esft_jax.model.config import ConfigError, ModelConfig
from esft_jax.sharding import to_host
from esft_jax.train.settings import MethodSettings
from esft_jax.train.trainable import (
    ALWAYS_FROZEN,
    SHARED,
    Params,
    cast_like,
    float32_copy,
    hf_tensors,
    is_shared,
    non_expert_part,
    overlay,
    tree_size,
)


def _shared_part(moe: Params) -> Params:
    return {k: moe[k] for k in SHARED if k in moe}


@dataclasses.dataclass(frozen=True, eq=False)
class ExpertSubset:
    """ESFT: the selected routed experts (+ shared experts / non-expert modules if flagged)."""

    cfg: ModelConfig
    expert_config: ExpertConfig
    rows: np.ndarray  # [N, 2] (moe layer index, expert id) of each selected expert, config order
    row_slots: np.ndarray  # [N] the override slot of each row in its layer
    slot_ids: np.ndarray  # [L, S] expert id of each slot, -1 = unused

    @classmethod
    def build(cls, cfg: ModelConfig, expert_config: ExpertConfig) -> ExpertSubset:
        if cfg.linear_fp8 and (expert_config.shared_experts or expert_config.non_expert_modules):
            raise ConfigError(
                "training the shared experts or the non-expert modules needs them unquantised, "
                "not FP8 (model.frozen_dtype=bfloat16)"
            )
        per_layer = [expert_config.experts.get(layer, []) for layer in cfg.moe_layer_ids]
        width = max([len(ids) for ids in per_layer] + [1])
        slot_ids = -np.ones((cfg.num_moe_layers, width), np.int32)
        for li, ids in enumerate(per_layer):
            slot_ids[li, : len(ids)] = ids
        rows = [(li, e, j) for li, ids in enumerate(per_layer) for j, e in enumerate(ids)]
        rows_n3 = np.asarray(rows, np.int32).reshape(-1, 3)
        return cls(cfg, expert_config, rows_n3[:, :2], rows_n3[:, 2], slot_ids)

    @classmethod
    def from_settings(cls, s: MethodSettings, cfg: ModelConfig) -> ExpertSubset:
        """The experts of the file `s.expert_config`; without one (esft plan), the first
        round(s.expert_fraction * E) experts of every MoE layer."""
        layers, n_experts = cfg.moe_layer_ids, cfg.n_routed_experts
        if s.expert_config:
            return cls.build(cfg, ExpertConfig.load(s.expert_config, layers, n_experts))
        first = max(1, round(s.expert_fraction * n_experts))
        return cls.build(cfg, ExpertConfig({layer: list(range(first)) for layer in layers}))

    def slot_of(self) -> dict[tuple[int, int], int]:
        """(MoE layer index, expert id) -> its override slot, for every selected expert."""
        return dict(zip(map(tuple, self.rows.tolist()), self.row_slots.tolist()))

    def slot_rows(self, experts: Params) -> Params:
        """The selected experts' rows of every expert leaf (`experts`: the stacked [L, E, ...]) in
        the override layout [L, S, ...], in the param dtype (quantised experts dequantised as a bf16
        load of the checkpoint would be), unused slots zero."""
        layer, expert = np.arange(len(self.slot_ids))[:, None], np.maximum(self.slot_ids, 0)
        used = self.slot_ids >= 0
        rows = quant.rows(experts, (layer, expert), self.cfg.expert_scheme, self.cfg.param_dtype)
        return {
            k: jnp.where(used.reshape(*used.shape, *(1,) * (w.ndim - 2)), w, 0)
            for k, w in rows.items()
        }

    def init(self, frozen: Params) -> Params:
        trainable: Params = {}
        if self.rows.size:  # no routed expert at all: e.g. the "shared experts only" ablation
            rows = self.slot_rows(frozen["moe_layers"]["moe"]["experts"])
            trainable["experts"] = {k: w.astype(jnp.float32) for k, w in rows.items()}
        if self.expert_config.shared_experts and "shared" in frozen["moe_layers"]["moe"]:
            trainable["shared"] = float32_copy(_shared_part(frozen["moe_layers"]["moe"]))
        if self.expert_config.non_expert_modules:
            trainable["non_expert"] = float32_copy(non_expert_part(frozen))
        return trainable

    def num_trained(self, trainable: Params) -> int:
        unused = self.slot_ids.size - len(self.rows)
        per_slot = sum(math.prod(w.shape[2:]) for w in trainable.get("experts", {}).values())
        return tree_size(trainable) - unused * per_slot

    def axes(self, model_axes: Params, trainable: Params) -> Params:
        out: Params = {}
        if "experts" in trainable:
            out["experts"] = {
                k: (axes[0], None, *axes[2:])  # the layers as the model's, slots replicated
                for k, axes in model_axes["moe_layers"]["moe"]["experts"].items()
                if not k.endswith(quant.SCALE)
            }
        if "shared" in trainable:
            out["shared"] = _shared_part(model_axes["moe_layers"]["moe"])
        if "non_expert" in trainable:
            out["non_expert"] = non_expert_part(model_axes)
        return out

    def _subtrees(self, trainable: Params) -> Params:
        """The trainable leaves other than the expert rows, laid out as in the params."""
        top = dict(trainable.get("non_expert", {}))
        if "shared" in trainable:
            moe_layers = dict(top.get("moe_layers", {}))
            moe_layers["moe"] = {**moe_layers.get("moe", {}), **trainable["shared"]}
            top["moe_layers"] = moe_layers
        return top

    def materialize(self, frozen: Params, trainable: Params) -> Params:
        params = overlay(frozen, self._subtrees(trainable))
        if "experts" not in trainable:
            return params
        return self.with_override(params, trainable["experts"])

    def with_override(self, params: Params, rows: Params) -> Params:
        """`params` with `rows` (every expert leaf's [L, S, ...] slot rows) as the MoE layers'
        expert overrides: the forward pass computes the selected experts from them."""
        override = {**rows, "ids": jnp.asarray(self.slot_ids)}
        moe_layers = dict(params["moe_layers"])
        moe_layers["moe"] = {**moe_layers["moe"], "override": override}
        return {**params, "moe_layers": moe_layers}

    def write_back(self, frozen: Params, trainable: Params) -> Params:
        params = cast_like(overlay(frozen, self._subtrees(trainable)), frozen)
        if "experts" not in trainable:
            return params
        return self.write_rows(params, trainable["experts"])

    def write_rows(self, params: Params, rows: Params) -> Params:
        """`params` with the selected experts of the stacked experts replaced by their rows in `rows`
        ([L, S, ...] slot rows of some expert leaves), in the stack's dtype; quantised experts
        re-quantised, block by block."""
        experts = dict(params["moe_layers"]["moe"]["experts"])
        layer, expert = self.rows[:, 0], self.rows[:, 1]
        for k, slots in rows.items():
            trained = slots[layer, self.row_slots]
            if k + quant.SCALE in experts:
                scheme = self.cfg.expert_scheme
                values, scale = scheme.quantize(trained.astype(self.cfg.param_dtype))
                experts[k + quant.SCALE] = experts[k + quant.SCALE].at[layer, expert].set(scale)
                trained = values
            experts[k] = experts[k].at[layer, expert].set(trained.astype(experts[k].dtype))
        moe_layers = dict(params["moe_layers"])
        moe_layers["moe"] = {**moe_layers["moe"], "experts": experts}
        return {**params, "moe_layers": moe_layers}

    def adapter_tensors(
        self, cfg: ModelConfig, frozen: Params, trainable: Params
    ) -> tuple[dict, dict]:
        """The selected experts' tensors (+ the shared experts' / non-expert tensors if flagged); the
        metadata holds the expert config and, when it has one, its profile as "routing_profile"."""
        selected = set(map(tuple, self.rows.tolist()))  # (moe layer index, expert)
        ec = self.expert_config

        def changed(m: TensorMap) -> bool:
            if "experts" in m.path:
                return m.index in selected
            if m.path[-1] in ALWAYS_FROZEN:
                return False
            return ec.shared_experts if is_shared(m.path) else ec.non_expert_modules

        if cfg.expert_scheme is not None:
            tensors = self._quantized_adapter_tensors(cfg, frozen, trainable, changed)
        else:
            tensors = hf_tensors(cfg, self.write_back(frozen, trainable), changed)
        return tensors, {"method": "esft", **self.selection_metadata()}

    def selection_metadata(self) -> dict:
        """The adapter metadata of the selection: its expert config and, when it has one, its
        profile as "routing_profile" (once, where the server's monitor reads it: serve/bank.py)."""
        ec = self.expert_config
        metadata = {"expert_config": dataclasses.replace(ec, profile=None).to_json()}
        if ec.profile is not None:
            metadata["routing_profile"] = ec.profile
        return metadata

    def _quantized_adapter_tensors(
        self, cfg: ModelConfig, frozen: Params, trainable: Params, changed
    ) -> dict[str, np.ndarray]:
        """adapter_tensors over quantised experts: the trained experts' rows in bfloat16 (as a bf16
        load holds those experts), never the quantised stack gathered or re-quantised."""
        params = cast_like(overlay(frozen, self._subtrees(trainable)), frozen)
        moe = {k: v for k, v in params["moe_layers"]["moe"].items() if k != "experts"}
        params = {**params, "moe_layers": {**params["moe_layers"], "moe": moe}}
        tensors = hf_tensors(cfg, params, lambda m: "experts" not in m.path and changed(m))
        rows = to_host(trainable.get("experts", {}))
        experts = frozen["moe_layers"]["moe"]["experts"]
        dtypes = {  # quantised matrices in bf16, biases in their own dtype
            k: jnp.bfloat16 if k + quant.SCALE in experts else experts[k].dtype for k in rows
        }
        slot = self.slot_of()
        for m in tensor_maps(cfg):
            if "experts" in m.path and m.index in slot:
                row = rows[m.path[-1]][m.index[0], slot[m.index]]
                tensors[m.hf_name] = m.to_hf(np.asarray(row).astype(dtypes[m.path[-1]]))
        return tensors

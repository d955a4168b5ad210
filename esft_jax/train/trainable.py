"""What trains: a method splits the model into frozen params and a compact trainable pytree.

Every method has the same three functions over pytrees, so one train loop serves them all:
- `init(frozen)`: the trainable pytree (float32 master copies), and nothing else: optimizer state
  exists only for it.
- `materialize(frozen, trainable)`: the params the forward pass sees. Frozen leaves enter as
  constants, so no weight gradient is ever computed for them.
- `write_back(frozen, trainable)`: full params in the frozen dtypes (checkpoints, export).

ESFT keeps the selected experts' rows compact (weights and, where the experts have them, biases):
[N, d, f] for the N selected (layer, expert) pairs,
with no padding. `materialize` gathers them into the model's per-layer expert overrides
(model/moe.py), padded to the largest per-layer count with unused slots (id -1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.expert_config import ExpertConfig
from esft_jax.model.config import ModelConfig

Params = dict[str, Any]


def overlay(base: Params, top: Params) -> Params:
    """`base` with every leaf that `top` also has replaced by top's (nested dicts)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = overlay(base[key], value) if isinstance(value, dict) else value
    return out


SHARED = ("shared", "shared_gate")  # the shared experts and their gate (Qwen2-MoE)
# Never trained by ESFT: the choice correction of noaux_tc routers is a load-balancing buffer, not a
# weight of the loss (the reference updates it outside the optimiser).
ALWAYS_FROZEN = ("router_correction",)


def is_shared(path: tuple[str, ...]) -> bool:
    """Whether a param path, e.g. ("moe_layers", "moe", "shared", "up"), is part of the shared experts."""
    return path[1:2] == ("moe",) and path[2] in SHARED


def non_expert_part(params: Params) -> Params:
    """Everything but the routed and shared experts (and the frozen buffers): attention, norms,
    embeddings, head, router (and its logit bias), and the dense layers' MLPs."""
    out = {k: v for k, v in params.items() if k != "moe_layers"}
    if "moe_layers" in params:
        moe_layers = dict(params["moe_layers"])
        skip = ("experts", *SHARED, *ALWAYS_FROZEN)
        moe_layers["moe"] = {k: v for k, v in moe_layers["moe"].items() if k not in skip}
        out["moe_layers"] = moe_layers
    return out


def _shared_part(moe: Params) -> Params:
    return {k: moe[k] for k in SHARED if k in moe}


def _float32(tree: Params) -> Params:
    """Float32 copies (never aliases of the frozen arrays: the train step donates its state)."""
    return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), tree)


def cast_like(tree: Params, like: Params) -> Params:
    return jax.tree.map(lambda x, ref: x.astype(ref.dtype), tree, like)


@dataclasses.dataclass(frozen=True)
class FullFineTune:
    """FFT: every parameter trains."""

    def init(self, frozen: Params) -> Params:
        return _float32(frozen)

    def materialize(self, frozen: Params, trainable: Params) -> Params:
        return trainable

    def axes(self, model_axes: Params, trainable: Params) -> Params:
        """Logical axis names of the trainable leaves (for sharding them like the model)."""
        return model_axes

    def write_back(self, frozen: Params, trainable: Params) -> Params:
        return cast_like(trainable, frozen)


@dataclasses.dataclass(frozen=True, eq=False)
class ExpertSubset:
    """ESFT: the selected routed experts (+ shared experts / non-expert modules if flagged)."""

    cfg: ModelConfig
    expert_config: ExpertConfig
    rows: np.ndarray  # [N, 2] (moe layer index, expert id) of every selected expert, in config order
    slots: np.ndarray  # [L, S] index into rows of each override slot (0 for unused slots)
    slot_ids: np.ndarray  # [L, S] expert id of each slot, -1 = unused

    @classmethod
    def build(cls, cfg: ModelConfig, expert_config: ExpertConfig) -> "ExpertSubset":
        num_layers = cfg.num_moe_layers
        per_layer = [expert_config.experts.get(layer, []) for layer in cfg.moe_layer_ids]
        width = max([len(ids) for ids in per_layer] + [1])
        rows, slots, slot_ids = [], np.zeros((num_layers, width), np.int32), -np.ones((num_layers, width), np.int32)
        for l, ids in enumerate(per_layer):
            for j, e in enumerate(ids):
                slots[l, j], slot_ids[l, j] = len(rows), e
                rows.append((l, e))
        return cls(cfg, expert_config, np.asarray(rows, np.int32).reshape(-1, 2), slots, slot_ids)

    def init(self, frozen: Params) -> Params:
        experts = frozen["moe_layers"]["moe"]["experts"]
        layer, expert = self.rows[:, 0], self.rows[:, 1]
        trainable: Params = {}
        if self.rows.size:  # no routed expert at all: e.g. the "shared experts only" ablation
            trainable["experts"] = {k: jnp.asarray(w[layer, expert], jnp.float32) for k, w in experts.items()}
        if self.expert_config.shared_experts and "shared" in frozen["moe_layers"]["moe"]:
            trainable["shared"] = _float32(_shared_part(frozen["moe_layers"]["moe"]))
        if self.expert_config.non_expert_modules:
            trainable["non_expert"] = _float32(non_expert_part(frozen))
        return trainable

    def axes(self, model_axes: Params, trainable: Params) -> Params:
        out: Params = {}
        if "experts" in trainable:
            out["experts"] = {k: (None, *axes[2:]) for k, axes in model_axes["moe_layers"]["moe"]["experts"].items()}
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
        override = {k: rows[self.slots] for k, rows in trainable["experts"].items()}  # [L, S, ...]
        override["ids"] = jnp.asarray(self.slot_ids)
        moe_layers = dict(params["moe_layers"])
        moe_layers["moe"] = {**moe_layers["moe"], "override": override}
        return {**params, "moe_layers": moe_layers}

    def write_back(self, frozen: Params, trainable: Params) -> Params:
        params = cast_like(overlay(frozen, self._subtrees(trainable)), frozen)
        if "experts" not in trainable:
            return params
        experts = params["moe_layers"]["moe"]["experts"]
        layer, expert = self.rows[:, 0], self.rows[:, 1]
        experts = {k: w.at[layer, expert].set(trainable["experts"][k].astype(w.dtype)) for k, w in experts.items()}
        moe_layers = dict(params["moe_layers"])
        moe_layers["moe"] = {**moe_layers["moe"], "experts": experts}
        return {**params, "moe_layers": moe_layers}

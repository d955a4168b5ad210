"""LoRA baseline: W + (alpha / r) * A @ B on attention and expert projections, merged on export.

A weight stored as [*batch, *in, *out] (batch: the stacked layer axis, and the expert axis for
routed experts) gets A [*batch, prod(in), r] (normal, std 1/sqrt(prod(in))) and B [*batch, r,
prod(out)] (zeros), so training starts from the base model exactly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from esft_jax.checkpoint.adapter import LORA_A, LORA_B
from esft_jax.checkpoint.hf_names import tensor_maps
from esft_jax.model.config import ModelConfig
from esft_jax.model.params import input_dims
from esft_jax.sharding import to_host
from esft_jax.train.settings import MethodSettings
from esft_jax.train.trainable import Params, cast_like, overlay, tree_size

TARGETS = ("attention", "experts", "shared_experts")


def split_dims(path: tuple[str, ...], shape: tuple[int, ...], n_batch: int):
    """(batch dims, fan-in, fan-out) of the weight at path (path[0] is the layer group)."""
    n_in = input_dims(path)
    return (
        shape[:n_batch],
        math.prod(shape[n_batch : n_batch + n_in]),
        math.prod(shape[n_batch + n_in :]),
    )


def init_factors(
    key: jax.Array, batch: tuple[int, ...], n_in: int, n_out: int, rank: int
) -> Params:
    """{"a": [*batch, n_in, rank] normal, std 1/sqrt(n_in); "b": [*batch, rank, n_out] zeros}: the
    update A @ B starts at zero, so training starts from the base model exactly."""
    return {
        "a": jax.random.normal(key, (*batch, n_in, rank), jnp.float32) / math.sqrt(n_in),
        "b": jnp.zeros((*batch, rank, n_out), jnp.float32),
    }


def merge(w: jax.Array, ab: Params, scale: float) -> jax.Array:
    """W + scale * A @ B in float32, W [*batch, *in, *out] (A @ B reshaped to it)."""
    return w.astype(jnp.float32) + jnp.matmul(ab["a"], ab["b"]).reshape(w.shape) * scale


def factor_tensors(weight_name: str, a_ir: np.ndarray, b_ro: np.ndarray) -> dict[str, np.ndarray]:
    """One matrix's factors A [in, r], B [r, out] as PEFT's lora_A [r, in], lora_B [out, r] beside
    the HF weight `weight_name` (checkpoint/adapter.py merges them)."""
    base = weight_name[: -len(".weight")]
    return {base + LORA_A: np.asarray(a_ir).T, base + LORA_B: np.asarray(b_ro).T}


@dataclasses.dataclass(frozen=True)
class LoRA:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention", "experts")
    seed: int = 0

    expert_config = None  # not an ESFT run

    @classmethod
    def from_settings(cls, s: MethodSettings, cfg: ModelConfig) -> LoRA:
        return cls(rank=s.lora_rank, alpha=s.lora_alpha, targets=s.lora_targets, seed=s.seed)

    def __post_init__(self):
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; expected some of {TARGETS}")

    def target_paths(self, frozen: Params) -> list[tuple[tuple[str, ...], int]]:
        """(path, number of batch dims) of every adapted weight."""
        paths = []
        for group in ("dense_layers", "moe_layers"):
            if group not in frozen:
                continue
            if "attention" in self.targets:
                paths += [
                    ((group, "attn", name), 1)
                    for name in frozen[group]["attn"]
                    if input_dims((group, "attn", name)) is not None
                ]
            moe = frozen[group].get("moe", {})
            if "experts" in self.targets and "experts" in moe:
                paths += [
                    ((group, "moe", "experts", k), 2)
                    for k in moe["experts"]
                    if input_dims((group, "moe", "experts", k)) is not None
                ]
            if "shared_experts" in self.targets and "shared" in moe:
                paths += [((group, "moe", "shared", k), 1) for k in moe["shared"]]
        return paths

    def init(self, frozen: Params) -> Params:
        paths, leaves = self.target_paths(frozen), traverse_util.flatten_dict(frozen)
        keys = jax.random.split(jax.random.key(self.seed), len(paths))
        trainable = {}
        for (path, n_batch), key in zip(paths, keys):
            batch, n_in, n_out = split_dims(path, leaves[path].shape, n_batch)
            trainable["/".join(path)] = init_factors(key, batch, n_in, n_out, self.rank)
        return trainable

    def num_trained(self, trainable: Params) -> int:
        return tree_size(trainable)

    def axes(self, model_axes: Params, trainable: Params) -> Params:
        return jax.tree.map(lambda x: (None,) * x.ndim, trainable)  # small: replicated

    def materialize(self, frozen: Params, trainable: Params) -> Params:
        scale, leaves = self.alpha / self.rank, traverse_util.flatten_dict(frozen)
        merged = {}
        for name, ab in trainable.items():
            path = tuple(name.split("/"))
            merged[path] = merge(leaves[path], ab, scale)
        return overlay(frozen, traverse_util.unflatten_dict(merged))

    def write_back(self, frozen: Params, trainable: Params) -> Params:
        return cast_like(self.materialize(frozen, trainable), frozen)

    def adapter_tensors(
        self, cfg: ModelConfig, frozen: Params, trainable: Params
    ) -> tuple[dict, dict]:
        """The A [r, in] and B [out, r] factors of every adapted weight (PEFT's names and layout)."""
        host, tensors = to_host(trainable), {}
        for m in tensor_maps(cfg):
            ab = host.get("/".join(m.path))
            if ab is not None:
                tensors.update(factor_tensors(m.hf_name, ab["a"][m.index], ab["b"][m.index]))
        metadata = {
            "method": "lora",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "targets": list(self.targets),
        }
        return tensors, metadata

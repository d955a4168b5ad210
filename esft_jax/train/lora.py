"""LoRA baseline: W + (alpha / r) * A @ B on attention and expert projections, merged on export.

A weight stored as [*batch, *in, *out] (batch: the stacked layer axis, and the expert axis for
routed experts) gets A [*batch, prod(in), r] (normal, std 1/sqrt(prod(in))) and B [*batch, r,
prod(out)] (zeros), so training starts from the base model exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from esft_jax.model.params import input_dims
from esft_jax.train.trainable import Params, cast_like

TARGETS = ("attention", "experts", "shared_experts")


def _get(tree: Params, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _replace(tree: Params, path: tuple[str, ...], value: Any) -> Params:
    """A copy of tree (dicts copied along the path only) with the leaf at path replaced."""
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


@dataclasses.dataclass(frozen=True)
class LoRA:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention", "experts")
    seed: int = 0

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
                paths += [((group, "attn", name), 1) for name in frozen[group]["attn"]
                          if input_dims((group, "attn", name)) is not None]
            moe = frozen[group].get("moe", {})
            if "experts" in self.targets and "experts" in moe:
                paths += [((group, "moe", "experts", k), 2) for k in moe["experts"]
                          if input_dims((group, "moe", "experts", k)) is not None]
            if "shared_experts" in self.targets and "shared" in moe:
                paths += [((group, "moe", "shared", k), 1) for k in moe["shared"]]
        return paths

    @staticmethod
    def _split(path: tuple[str, ...], shape: tuple[int, ...], n_batch: int):
        """(batch dims, fan-in, fan-out) of the weight at path (path[0] is the layer group)."""
        n_in = input_dims(path)
        return shape[:n_batch], math.prod(shape[n_batch:n_batch + n_in]), math.prod(shape[n_batch + n_in:])

    def init(self, frozen: Params) -> Params:
        paths = self.target_paths(frozen)
        keys = jax.random.split(jax.random.key(self.seed), len(paths))
        trainable = {}
        for (path, n_batch), key in zip(paths, keys):
            batch, n_in, n_out = self._split(path, _get(frozen, path).shape, n_batch)
            trainable["/".join(path)] = {
                "a": jax.random.normal(key, (*batch, n_in, self.rank), jnp.float32) / math.sqrt(n_in),
                "b": jnp.zeros((*batch, self.rank, n_out), jnp.float32)}
        return trainable

    def axes(self, model_axes: Params, trainable: Params) -> Params:
        return jax.tree.map(lambda x: (None,) * x.ndim, trainable)  # small: replicated

    def materialize(self, frozen: Params, trainable: Params) -> Params:
        scale = self.alpha / self.rank
        params = frozen
        for name, ab in trainable.items():
            path = tuple(name.split("/"))
            w = _get(frozen, path)
            params = _replace(params, path, w.astype(jnp.float32) + jnp.matmul(ab["a"], ab["b"]).reshape(w.shape) * scale)
        return params

    def write_back(self, frozen: Params, trainable: Params) -> Params:
        return cast_like(self.materialize(frozen, trainable), frozen)

"""Mixtral (8x7B, 8x22B): GQA, softmax over the top-k logits (= softmax, top-k, renormalise), every
layer MoE, experts as `block_sparse_moe.experts.N.w1/w3/w2` (gate/up/down) on the Hub."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from esft_jax.checkpoint.families import base
from esft_jax.model.config import ModelConfig

NAMES = {
    **base.NORMS,
    **base.GQA,
    **base.experts("block_sparse_moe.experts.{e}.", "w1", "w3", "w2"),
    ("moe", "router"): "block_sparse_moe.gate.weight",
}
# transformers 5's in-memory layout renames block_sparse_moe to mlp.
FUSED = base.transformers_fused(
    "block_sparse_moe.experts.{e}.", "w1.weight", "w3.weight", "w2.weight"
)
RENAMES = {"mlp.gate.weight": "block_sparse_moe.gate.weight"}


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    window = hf.get("sliding_window")
    return dict(
        base.gqa_moe_fields(hf),
        norm_topk_prob=True,
        sliding_window=window,
        sliding_window_layers=tuple(range(hf["num_hidden_layers"])) if window else (),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return base.gqa_moe_hf(cfg, FAMILY.architecture, sliding_window=cfg.sliding_window)


FAMILY = base.Family(
    "mixtral", "MixtralForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED, read_renames=RENAMES
)

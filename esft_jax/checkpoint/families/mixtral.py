"""Mixtral (8x7B, 8x22B): GQA, softmax over the top-k logits (= softmax, top-k, renormalise), every
layer MoE, experts as `block_sparse_moe.experts.N.w1/w3/w2` (gate/up/down) on the Hub."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from esft_jax.checkpoint.families.base import (
    GQA,
    NORMS,
    Family,
    common_fields,
    common_hf,
    experts,
    gqa_fields,
    gqa_hf,
    require,
    transformers_fused,
)
from esft_jax.model.config import ModelConfig

NAMES = {
    **NORMS,
    **GQA,
    **experts("block_sparse_moe.experts.{e}.", "w1", "w3", "w2"),
    ("moe", "router"): "block_sparse_moe.gate.weight",
}
# transformers 5's in-memory layout renames block_sparse_moe to mlp.
FUSED = transformers_fused("block_sparse_moe.experts.{e}.", "w1.weight", "w3.weight", "w2.weight")
RENAMES = {"mlp.gate.weight": "block_sparse_moe.gate.weight"}


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    require(hf, ("intermediate_size", "num_local_experts", "num_experts_per_tok"))
    window = hf.get("sliding_window")
    return dict(
        common_fields(hf),
        **gqa_fields(hf),
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["intermediate_size"],
        first_k_dense_replace=0,
        n_routed_experts=hf["num_local_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        norm_topk_prob=True,
        n_shared_experts=0,
        sliding_window=window,
        sliding_window_layers=tuple(range(hf["num_hidden_layers"])) if window else (),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = common_hf(cfg, FAMILY.architecture)
    hf.update(
        gqa_hf(cfg),
        intermediate_size=cfg.moe_intermediate_size,
        num_local_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        sliding_window=cfg.sliding_window,
    )
    return hf


FAMILY = Family(
    "mixtral", "MixtralForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED, read_renames=RENAMES
)

"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): GQA with q/k/v biases, softmax top-k router, one
shared expert of its own width behind a sigmoid gate, MoE layers by `decoder_sparse_step` and
`mlp_only_layers`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from esft_jax.checkpoint.families import base
from esft_jax.model.config import ModelConfig

NAMES = {
    **base.NORMS,
    **base.DENSE_MLP,
    **base.GQA,
    **base.experts(),
    **base.shared_mlp("mlp.shared_expert"),
    ("moe", "router"): "mlp.gate.weight",
    ("moe", "shared_gate"): "mlp.shared_expert_gate.weight",
}
FUSED = base.MLP_FUSED


def qwen_moe_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """What Qwen2-MoE and Qwen3-MoE share: the layer pattern and the softmax top-k router.
    The expert count is `num_experts` on the Hub, `num_local_experts` in transformers 5's Qwen3-MoE."""
    hf = {**hf, "num_experts": hf.get("num_experts", hf.get("num_local_experts"))}
    base.require(
        hf, ("intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok")
    )
    return dict(
        base.common_fields(hf),
        **base.gqa_fields(hf),
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        first_k_dense_replace=0,
        moe_layer_step=hf.get("decoder_sparse_step") or 1,
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
        n_routed_experts=hf["num_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


def qwen_moe_hf(cfg: ModelConfig, architecture: str) -> dict[str, Any]:
    hf = base.common_hf(cfg, architecture)
    hf.update(
        base.gqa_hf(cfg),
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        decoder_sparse_step=cfg.moe_layer_step,
        mlp_only_layers=list(cfg.mlp_only_layers),
        num_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        norm_topk_prob=cfg.norm_topk_prob,
        use_sliding_window=bool(cfg.sliding_window_layers),
        sliding_window=cfg.sliding_window,
        layer_types=base.layer_types(cfg),
    )
    return hf


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    base.require(hf, ("shared_expert_intermediate_size",))
    n = hf["num_hidden_layers"]
    window_layers = hf.get("max_window_layers", n)
    default_types = (
        [
            "sliding_attention" if (i + 1) % 2 and i < window_layers else "full_attention"
            for i in range(n)
        ]
        if hf.get("use_sliding_window")
        else None
    )
    return dict(
        qwen_moe_fields(hf),
        **base.sliding_layers(hf, default_types),
        qkv_bias=bool(hf.get("qkv_bias", True)),
        n_shared_experts=0,
        shared_expert_intermediate_size=hf["shared_expert_intermediate_size"],
        shared_expert_gate=True,
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        qwen_moe_hf(cfg, FAMILY.architecture),
        qkv_bias=cfg.qkv_bias,
        shared_expert_intermediate_size=cfg.shared_intermediate_size,
    )


FAMILY = base.Family("qwen2_moe", "Qwen2MoeForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED)

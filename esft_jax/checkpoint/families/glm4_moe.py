"""GLM-4-MoE (GLM-4.5, GLM-4.5-Air): GQA with q/k/v biases, optional per-head QK-norm and partial
rotary (half of each head by default), DeepSeek-V3's router (sigmoid, correction bias, groups,
scaling) and shared experts behind a dense prefix. Multi-token-prediction layers are not loaded."""

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
    **base.shared_mlp("mlp.shared_experts"),
    ("moe", "router"): "mlp.gate.weight",
    ("moe", "router_correction"): "mlp.gate.e_score_correction_bias",
}
FUSED = base.MLP_FUSED


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    base.require(
        hf,
        ("intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"),
    )
    fields = dict(
        base.common_fields(hf),
        **base.gqa_fields(hf),
        qkv_bias=bool(hf.get("attention_bias", False)),
        qk_norm="head" if hf.get("use_qk_norm") else None,
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        first_k_dense_replace=hf.get("first_k_dense_replace", 1),
        n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=hf.get("n_shared_experts", 1),
        num_experts_per_tok=hf["num_experts_per_tok"],
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )
    rope = hf.get("rope_parameters") or {}
    if "partial_rotary_factor" not in rope and "partial_rotary_factor" not in hf:
        fields["partial_rotary_factor"] = 0.5  # transformers' default for this family
    return fields


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = base.common_hf(cfg, FAMILY.architecture)
    hf["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
    hf.update(
        base.gqa_hf(cfg),
        attention_bias=cfg.qkv_bias,
        use_qk_norm=cfg.qk_norm == "head",
        partial_rotary_factor=cfg.partial_rotary_factor,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        first_k_dense_replace=cfg.first_k_dense_replace,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
        num_nextn_predict_layers=0,
    )
    return hf


FAMILY = base.Family("glm4_moe", "Glm4MoeForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED)

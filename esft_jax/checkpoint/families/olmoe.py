"""OLMoE (OLMoE-1B-7B): MHA with RMS QK-norm over the whole q/k projections and optional `clip_qkv`,
softmax top-k router without renormalisation, every layer MoE, no shared expert."""

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

NAMES = {**NORMS, **GQA, **experts(), ("moe", "router"): "mlp.gate.weight"}
FUSED = transformers_fused(
    "mlp.experts.{e}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"
)


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    require(hf, ("intermediate_size", "num_experts", "num_experts_per_tok"))
    bias = bool(hf.get("attention_bias", False))
    return dict(
        common_fields(hf),
        **gqa_fields(hf),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=hf.get("clip_qkv"),
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["intermediate_size"],
        first_k_dense_replace=0,
        n_routed_experts=hf["num_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        n_shared_experts=0,
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = common_hf(cfg, FAMILY.architecture)
    hf.update(
        gqa_hf(cfg),
        attention_bias=cfg.qkv_bias,
        clip_qkv=cfg.clip_qkv,
        intermediate_size=cfg.moe_intermediate_size,
        num_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        norm_topk_prob=cfg.norm_topk_prob,
    )
    return hf


FAMILY = Family("olmoe", "OlmoeForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED)

"""OLMoE (OLMoE-1B-7B): MHA with RMS QK-norm over the whole q/k projections and optional `clip_qkv`,
softmax top-k router without renormalisation, every layer MoE, no shared expert."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from esft_jax.checkpoint.families import base
from esft_jax.model.config import ModelConfig

NAMES = {**base.NORMS, **base.GQA, **base.experts(), ("moe", "router"): "mlp.gate.weight"}
FUSED = base.MLP_FUSED


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return dict(
        base.gqa_moe_fields(hf, "num_experts"),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=hf.get("clip_qkv"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return base.gqa_moe_hf(
        cfg,
        FAMILY.architecture,
        "num_experts",
        attention_bias=cfg.qkv_bias,
        clip_qkv=cfg.clip_qkv,
        norm_topk_prob=cfg.norm_topk_prob,
    )


FAMILY = base.Family("olmoe", "OlmoeForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED)

"""gpt-oss (20b, 120b): GQA with biases and learned attention sinks, sliding-window and full layers
alternating (`layer_types`), a linear router with bias (softmax over the top-k logits), experts with
biases and a clamped SwiGLU, stored fused (gate/up columns interleaved; MXFP4 on the Hub, read by
checkpoint/mxfp4.py). Every layer is MoE. Adapters name each expert's tensors on its own
(`mlp.experts.{e}.gate_proj.weight`, ...), which is our format, not a Hub one."""

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
    gpt_oss_fused,
    gqa_fields,
    gqa_hf,
    layer_types,
    require,
    sliding_layers,
)
from esft_jax.model.config import ModelConfig

NAMES = {
    **NORMS,
    **GQA,
    **experts(),
    ("moe", "router"): "mlp.router.weight",
    ("moe", "router_bias"): "mlp.router.bias",
}
FUSED = gpt_oss_fused()


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    require(hf, ("intermediate_size", "num_local_experts", "num_experts_per_tok"))
    bias = bool(hf.get("attention_bias", True))
    n = hf["num_hidden_layers"]
    default_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    return dict(
        common_fields(hf),
        **gqa_fields(hf),
        **sliding_layers(hf, default_types),
        qkv_bias=bias,
        o_bias=bias,
        attention_sinks=True,
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["intermediate_size"],
        first_k_dense_replace=0,
        n_routed_experts=hf["num_local_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        norm_topk_prob=True,
        router_bias=True,
        n_shared_experts=0,
        expert_act="clamped_swiglu",
        expert_bias=True,
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = common_hf(cfg, FAMILY.architecture)
    hf.update(
        gqa_hf(cfg),
        attention_bias=cfg.qkv_bias,
        intermediate_size=cfg.moe_intermediate_size,
        num_local_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        sliding_window=cfg.sliding_window,
        layer_types=layer_types(cfg),
        swiglu_limit=cfg.swiglu_limit,
        swiglu_alpha=cfg.swiglu_alpha,
    )
    return hf


FAMILY = Family(
    "gpt_oss", "GptOssForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED, write_fused=FUSED
)

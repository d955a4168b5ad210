"""gpt-oss (20b, 120b): GQA with biases and learned attention sinks, sliding-window and full layers
alternating (`layer_types`), a linear router with bias (softmax over the top-k logits), experts with
biases and a clamped SwiGLU, stored fused (gate/up columns interleaved; MXFP4 on the Hub, read by
checkpoint/mxfp4.py). Every layer is MoE. Adapters name each expert's tensors on its own
(`mlp.experts.{e}.gate_proj.weight`, ...), which is our format, not a Hub one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from esft_jax.checkpoint.families import base
from esft_jax.model.config import ModelConfig

NAMES = {
    **base.NORMS,
    **base.GQA,
    **base.experts(),
    ("moe", "router"): "mlp.router.weight",
    ("moe", "router_bias"): "mlp.router.bias",
}
FUSED = base.gpt_oss_fused()


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", True))
    n = hf["num_hidden_layers"]
    default_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    return dict(
        base.gqa_moe_fields(hf),
        **base.sliding_layers(hf, default_types),
        qkv_bias=bias,
        o_bias=bias,
        attention_sinks=True,
        norm_topk_prob=True,
        router_bias=True,
        expert_act="clamped_swiglu",
        expert_bias=True,
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return base.gqa_moe_hf(
        cfg,
        FAMILY.architecture,
        attention_bias=cfg.qkv_bias,
        sliding_window=cfg.sliding_window,
        layer_types=base.layer_types(cfg),
        swiglu_limit=cfg.swiglu_limit,
        swiglu_alpha=cfg.swiglu_alpha,
    )


FAMILY = base.Family(
    "gpt_oss", "GptOssForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED, write_fused=FUSED
)

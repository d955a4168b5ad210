"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): GQA with per-head RMS QK-norm and a decoupled
`head_dim`, softmax top-k router with renormalisation, no shared expert."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from esft_jax.checkpoint.families import base
from esft_jax.checkpoint.families.qwen2_moe import FUSED, NAMES, qwen_moe_fields, qwen_moe_hf
from esft_jax.model.config import ModelConfig


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    sliding = tuple(range(hf["num_hidden_layers"])) if hf.get("use_sliding_window") else ()
    return dict(
        qwen_moe_fields(hf),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        n_shared_experts=0,
        sliding_window=hf.get("sliding_window") if sliding else None,
        sliding_window_layers=sliding,
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = dict(qwen_moe_hf(cfg, FAMILY.architecture), attention_bias=cfg.qkv_bias)
    del hf["layer_types"]  # Qwen3-MoE slides every layer or none
    return hf


FAMILY = base.Family("qwen3_moe", "Qwen3MoeForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED)

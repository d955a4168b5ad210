"""DeepSeek-V2 / V3 (and V3-architecture models: Moonlight, and Kimi K2, whose config.json says
`model_type: "kimi_k2"` and loads as deepseek_v3): MLA, shared experts, a dense prefix.

Reads both the remote-code era config.json of the Hub checkpoints (`rope_scaling`, top-level
`rope_theta`, `scoring_func`) and transformers 5's (`rope_parameters`); writes transformers 5's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from esft_jax.checkpoint.families import base
from esft_jax.model.config import ConfigError, ModelConfig

NAMES = {
    **base.NORMS,
    **base.DENSE_MLP,
    **base.experts(),
    **base.shared_mlp("mlp.shared_experts"),
    ("attn", "q"): "self_attn.q_proj.weight",
    ("attn", "q_a"): "self_attn.q_a_proj.weight",
    ("attn", "q_a_norm"): "self_attn.q_a_layernorm.weight",
    ("attn", "q_b"): "self_attn.q_b_proj.weight",
    ("attn", "kv_a"): "self_attn.kv_a_proj_with_mqa.weight",
    ("attn", "kv_a_norm"): "self_attn.kv_a_layernorm.weight",
    ("attn", "kv_b"): "self_attn.kv_b_proj.weight",
    ("attn", "o"): "self_attn.o_proj.weight",
    ("moe", "router"): "mlp.gate.weight",
    ("moe", "router_correction"): "mlp.gate.e_score_correction_bias",
}
V3_TYPES = ("deepseek_v3", "kimi_k2")  # Kimi K2 ships DeepSeek-V3's architecture under its own name
FUSED = base.MLP_FUSED


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    base.require(
        hf,
        (
            "intermediate_size",
            "moe_intermediate_size",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
        ),
    )
    v3 = hf["model_type"] in V3_TYPES
    if hf.get("moe_layer_freq", 1) != 1:
        raise ConfigError(
            f"moe_layer_freq={hf['moe_layer_freq']}: only 1 (every layer after the dense prefix "
            "is MoE) is supported"
        )
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads and not v3:
        raise ConfigError(
            f"num_key_value_heads={kv_heads} != num_attention_heads={heads}: "
            "MLA expands keys and values to every head"
        )
    return dict(
        base.common_fields(hf),
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        attention="mla",
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        first_k_dense_replace=hf.get("first_k_dense_replace", 0),
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=hf.get("n_shared_experts") or 0,
        num_experts_per_tok=hf["num_experts_per_tok"],
        scoring_func=hf.get("scoring_func", "sigmoid" if v3 else "softmax"),
        topk_method="noaux_tc" if v3 else (hf.get("topk_method") or "greedy"),
        n_group=hf.get("n_group") or (1 if v3 else None),
        topk_group=hf.get("topk_group") or (1 if v3 else None),
        norm_topk_prob=bool(hf.get("norm_topk_prob", v3)),
        scale_normalised_weights=v3,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        rope_interleave=bool(hf.get("rope_interleave", True)),
    )


def _to_hf(cfg: ModelConfig) -> dict[str, Any]:
    v3 = cfg.model_type == "deepseek_v3"
    hf = base.common_hf(cfg, "DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM")
    hf.update(
        {
            "intermediate_size": cfg.intermediate_size,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "first_k_dense_replace": cfg.first_k_dense_replace,
            "num_key_value_heads": cfg.num_attention_heads,
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "n_routed_experts": cfg.n_routed_experts,
            "n_shared_experts": cfg.n_shared_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "n_group": cfg.n_group,
            "topk_group": cfg.topk_group,
            "norm_topk_prob": cfg.norm_topk_prob,
            "routed_scaling_factor": cfg.routed_scaling_factor,
            "attention_bias": False,
        }
    )
    if v3:
        hf.update(rope_interleave=cfg.rope_interleave, num_nextn_predict_layers=0)
    else:
        hf.update(topk_method=cfg.topk_method)
    return hf


V2 = base.Family("deepseek_v2", "DeepseekV2ForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED)
V3 = base.Family("deepseek_v3", "DeepseekV3ForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED)
KIMI_K2 = base.Family("kimi_k2", "DeepseekV3ForCausalLM", NAMES, _from_hf, _to_hf, read_fused=FUSED)

"""Tiny random DeepSeek models built with transformers (the reference implementation), saved to disk."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
               num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
               n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4,
               initializer_range=0.08, max_position_embeddings=1280, bos_token_id=1, eos_token_id=2)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 32,
         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

VARIANTS = {
    "v2": dict(model_type="deepseek_v2", q_lora_rank=None),
    "v2_qlora_yarn": dict(model_type="deepseek_v2", q_lora_rank=24, rope_parameters=_YARN),
    "v2_group_limited": dict(model_type="deepseek_v2", q_lora_rank=None, topk_method="group_limited_greedy",
                             n_group=4, topk_group=2, routed_scaling_factor=1.5),
    "v3": dict(model_type="deepseek_v3", q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
               routed_scaling_factor=2.5, num_nextn_predict_layers=0),
}


def build(variant: str, out_dir: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Build the variant with random weights, save it to out_dir, return the torch model (eval, fp32)."""
    torch.manual_seed(seed)
    kw = {**_COMMON, **VARIANTS[variant]}
    model_type = kw.pop("model_type")
    if model_type == "deepseek_v2":
        cfg, cls = transformers.DeepseekV2Config(**kw), transformers.DeepseekV2ForCausalLM
    else:
        cfg, cls = transformers.DeepseekV3Config(**kw), transformers.DeepseekV3ForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.weight.normal_(0.0, 0.3)  # a router that actually discriminates
            if hasattr(layer.mlp.gate, "e_score_correction_bias"):
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(out_dir)
    return model


def load(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


def run(model: transformers.PreTrainedModel, tokens, attention_mask):
    """(logits [B, T, V], per MoE layer (ids [B*T, k], weights [B*T, k])) as numpy."""
    captured = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, out: captured.append((out[2], out[1])))
             for layer in model.model.layers[model.config.first_k_dense_replace:]]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(attention_mask))
    finally:
        for h in hooks:
            h.remove()
    return out.logits.float().numpy(), [(ids.numpy(), w.float().numpy()) for ids, w in captured]

"""Qwen3-30B-A3B (30.5B total, 3.3B active).

48 layers, all MoE: 128 routed experts of width 768, top-8 softmax renormalised, no shared expert.
Grouped-query attention, 32 query / 4 key-value heads of 128 (wider than hidden 2048 / 32), per-head
RMS QK-norm, no biases, rope theta 1e6.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model_type="qwen3_moe",
            attention="gqa",
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            first_k_dense_replace=0,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            qk_norm="head",
            rope_interleave=False,
            n_routed_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            n_shared_experts=0,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            bos_token_id=151643,
            eos_token_id=151645,
            param_dtype="bfloat16",
        )
    )

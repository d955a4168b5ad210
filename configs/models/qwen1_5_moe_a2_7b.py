"""Qwen1.5-MoE-A2.7B (14.3B total, 2.7B active): upcycled from Qwen-1.8B.

24 layers, all MoE: 60 routed experts of width 1408, top-4 softmax without renormalisation, plus one
shared expert of width 5632 behind a sigmoid gate. Multi-head attention (16 heads of 128) with q/k/v
biases, rope theta 1e6.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model_type="qwen2_moe",
            attention="gqa",
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=5632,
            moe_intermediate_size=1408,
            num_hidden_layers=24,
            first_k_dense_replace=0,
            num_attention_heads=16,
            num_key_value_heads=16,
            head_dim=128,
            qkv_bias=True,
            rope_interleave=False,
            n_routed_experts=60,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            n_shared_experts=0,
            shared_expert_intermediate_size=5632,
            shared_expert_gate=True,
            rope_theta=1000000.0,
            max_position_embeddings=8192,
            rms_norm_eps=1e-6,
            bos_token_id=151643,
            eos_token_id=151643,
            param_dtype="bfloat16",
        )
    )

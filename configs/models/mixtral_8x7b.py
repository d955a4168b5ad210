"""Mixtral-8x7B-v0.1 (46.7B total, 12.9B active).

32 layers, all MoE: 8 experts of width 14336, top-2 (softmax over the two chosen logits), no shared
expert. Grouped-query attention, 32 query / 8 key-value heads of 128, no biases, rope theta 1e6, no
sliding window.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model_type="mixtral",
            attention="gqa",
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            moe_intermediate_size=14336,
            num_hidden_layers=32,
            first_k_dense_replace=0,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rope_interleave=False,
            n_routed_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            n_shared_experts=0,
            rope_theta=1000000.0,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            param_dtype="bfloat16",
        )
    )

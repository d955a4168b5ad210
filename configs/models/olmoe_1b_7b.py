"""OLMoE-1B-7B-0924 (6.9B total, 1.3B active).

16 layers, all MoE: 64 routed experts of width 1024, top-8 softmax without renormalisation, no shared
expert. Multi-head attention (16 heads of 128) with RMS QK-norm over the whole q and k projections,
no biases, no clip_qkv. The Hub checkpoint is float32; we hold it in bfloat16.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model_type="olmoe",
            attention="gqa",
            vocab_size=50304,
            hidden_size=2048,
            intermediate_size=1024,
            moe_intermediate_size=1024,
            num_hidden_layers=16,
            first_k_dense_replace=0,
            num_attention_heads=16,
            num_key_value_heads=16,
            head_dim=128,
            qk_norm="full",
            clip_qkv=None,
            rope_interleave=False,
            n_routed_experts=64,
            num_experts_per_tok=8,
            norm_topk_prob=False,
            n_shared_experts=0,
            rope_theta=10000.0,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=None,
            eos_token_id=50279,
            pad_token_id=1,
            param_dtype="bfloat16",
        )
    )

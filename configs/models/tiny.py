"""A tiny DeepSeek-V2-style MoE for tests and quick runs, sized for the byte tokenizer
(data/byte_tokenizer.py)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model_type="deepseek_v2",
            vocab_size=260,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            first_k_dense_replace=1,
            num_attention_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=32,
            n_shared_experts=2,
            num_experts_per_tok=4,
            scoring_func="softmax",
            topk_method="greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            scale_normalised_weights=False,
            rope_theta=10000.0,
            max_position_embeddings=4096,  # the default seq_len of the configs (0: 4096)
            rms_norm_eps=1e-6,
            bos_token_id=256,
            eos_token_id=257,
            pad_token_id=258,  # the byte tokenizer's specials
            param_dtype="float32",
            dtype="float32",
            scan_layers=False,  # 4 layers: a loop compiles as fast, ESFT steps faster
        )
    )

"""DeepSeek-V2-Lite (15.7B total, 2.4B active): the ESFT backbone.

27 layers (the first dense, 26 MoE), 64 routed experts of width 1408 + 2 shared, top-6 softmax gate
without renormalisation, MLA without a query bottleneck, YaRN rope (factor 40 over 4K).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model_type="deepseek_v2",
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=27,
            first_k_dense_replace=1,
            num_attention_heads=16,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            scoring_func="softmax",
            topk_method="greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            scale_normalised_weights=False,
            rope_theta=10000.0,
            rope_type="yarn",
            rope_factor=40.0,
            rope_original_max_position_embeddings=4096,
            rope_beta_fast=32.0,
            rope_beta_slow=1.0,
            rope_mscale=0.707,
            rope_mscale_all_dim=0.707,
            max_position_embeddings=163840,
            rms_norm_eps=1e-6,
            bos_token_id=100000,
            eos_token_id=100001,
            param_dtype="bfloat16",
        )
    )

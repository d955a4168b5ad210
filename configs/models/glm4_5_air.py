"""GLM-4.5-Air (106B total, 12B active; both counts without the embedding tables).

46 layers (the first dense, 45 MoE): 128 routed experts of width 1408 + 1 shared, DeepSeek-V3's gate
(sigmoid, choice bias, top-8 renormalised, one group, no scaling). Grouped-query attention, 96 query /
8 key-value heads of 128 (q is 3x hidden), q/k/v biases, rope on half of each head, theta 1e6. The
release's multi-token-prediction layer is not part of this model.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model_type="glm4_moe",
            attention="gqa",
            vocab_size=151552,
            hidden_size=4096,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=46,
            first_k_dense_replace=1,
            num_attention_heads=96,
            num_key_value_heads=8,
            head_dim=128,
            partial_rotary_factor=0.5,
            qkv_bias=True,
            qk_norm=None,
            rope_interleave=False,
            n_routed_experts=128,
            n_shared_experts=1,
            num_experts_per_tok=8,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            rope_theta=1000000.0,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            eos_token_id=151329,
            eos_token_ids=(151329, 151336, 151338),  # <|endoftext|>, <|user|>, <|observation|>
            pad_token_id=151329,
            param_dtype="bfloat16",
        )
    )

"""DeepSeek-V3 (671B total, 37B active): sigmoid gate with a bias for choosing, group-limited top-8.

61 layers (the first 3 dense), 256 routed experts of width 2048 + 1 shared; 8 expert groups of which
4 are kept per token. The multi-token-prediction layer of the release is not part of this model.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model_type="deepseek_v3",
            vocab_size=129280,
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            first_k_dense_replace=3,
            num_attention_heads=128,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=256,
            n_shared_experts=1,
            num_experts_per_tok=8,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            n_group=8,
            topk_group=4,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_theta=10000.0,
            rope_type="yarn",
            rope_factor=40.0,
            rope_original_max_position_embeddings=4096,
            rope_beta_fast=32.0,
            rope_beta_slow=1.0,
            rope_mscale=1.0,
            rope_mscale_all_dim=1.0,
            max_position_embeddings=163840,
            rms_norm_eps=1e-6,
            bos_token_id=0,
            eos_token_id=1,
            param_dtype="bfloat16",
        )
    )

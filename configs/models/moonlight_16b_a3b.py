"""Moonlight-16B-A3B (16B total, 3B active; 15.29B and 2.24B without the embedding tables): a
DeepSeek-V3-architecture model (config.json model_type "deepseek_v3") trained with Muon, the shape of
DeepSeek-V2-Lite with Kimi's 163840-token vocabulary.

27 layers (the first dense, 26 MoE), 64 routed experts of width 1408 + 2 shared; sigmoid gate with a
choice bias, top-6 renormalised and scaled by 2.446, one group. MLA without a query bottleneck, plain
rope (theta 50000, 8K context). Token ids as in the -Instruct release's config.json.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model_type="deepseek_v3",
            vocab_size=163840,
            hidden_size=2048,
            intermediate_size=11264,
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
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.446,
            rope_theta=50000.0,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            bos_token_id=163584,
            eos_token_id=163586,
            param_dtype="bfloat16",
        )
    )

"""gpt-oss-20b (20.9B total, 3.6B active; the active count includes the unembedding, not the embedding).

24 layers, all MoE: 32 experts of width 2880 with biases and a clamped SwiGLU, top-4 (softmax over the
chosen logits of a router with bias). Grouped-query attention, 64 query / 8 key-value heads of 64, all
projections with biases, a learned sink per head; even layers attend within a 128-token window, odd
layers to everything. YaRN rope (factor 32 over 4K, theta 150000) without rounding the correction range.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model_type="gpt_oss",
            attention="gqa",
            vocab_size=201088,
            hidden_size=2880,
            intermediate_size=2880,
            moe_intermediate_size=2880,
            num_hidden_layers=24,
            first_k_dense_replace=0,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            qkv_bias=True,
            o_bias=True,
            attention_sinks=True,
            rope_interleave=False,
            sliding_window=128,
            sliding_window_layers=tuple(range(0, 24, 2)),
            n_routed_experts=32,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            router_bias=True,
            n_shared_experts=0,
            expert_act="clamped_swiglu",
            expert_bias=True,
            swiglu_limit=7.0,
            swiglu_alpha=1.702,
            rope_theta=150000.0,
            rope_type="yarn",
            rope_factor=32.0,
            rope_original_max_position_embeddings=4096,
            rope_beta_fast=32.0,
            rope_beta_slow=1.0,
            rope_truncate=False,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            eos_token_id=200002,
            pad_token_id=199999,
            param_dtype="bfloat16",
        )
    )

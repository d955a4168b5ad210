"""Tiny config.json dicts of every supported family, each with its optional features on, read
through the family's own mapping (no transformers needed: parity with it is tests/test_hf_parity.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.checkpoint.hf_names import config_from_hf
from esft_jax.model import ModelConfig, init_params

_COMMON = dict(
    vocab_size=96,
    hidden_size=40,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
_YARN = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 8.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 16,
}

HF = {
    "deepseek_v3": dict(
        _COMMON,
        model_type="deepseek_v3",
        num_key_value_heads=4,
        intermediate_size=72,
        moe_intermediate_size=24,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    "qwen2_moe": dict(
        _COMMON,
        model_type="qwen2_moe",
        intermediate_size=64,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=8,
        num_experts_per_tok=3,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        qkv_bias=True,
    ),
    "qwen3_moe": dict(
        _COMMON,
        model_type="qwen3_moe",
        head_dim=12,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    ),
    "olmoe": dict(
        _COMMON,
        model_type="olmoe",
        num_key_value_heads=4,
        intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        clip_qkv=0.5,
    ),
    "mixtral": dict(
        _COMMON,
        model_type="mixtral",
        intermediate_size=24,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=6,
    ),
    "glm4_moe": dict(
        _COMMON,
        model_type="glm4_moe",
        head_dim=12,
        intermediate_size=64,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        use_qk_norm=True,
        attention_bias=True,
        partial_rotary_factor=0.5,
        routed_scaling_factor=1.5,
    ),
    "gpt_oss": dict(
        _COMMON,
        model_type="gpt_oss",
        head_dim=12,
        intermediate_size=24,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=6,
        rope_parameters=_YARN,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
}
FAMILIES = tuple(HF)
NEW_FAMILIES = FAMILIES[1:]  # DeepSeek's strategies, sharding and ESFT have their own tests


def config(family: str, **runtime) -> ModelConfig:
    return config_from_hf(HF[family], **runtime)


def params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random params with every bias, sink, norm and correction non-zero (so that ignoring one shows)
    and a router that discriminates."""
    p = init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(p)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        noise = 0.1 * jax.random.normal(key, leaf.shape, leaf.dtype)
        out.append(leaf * 15 if name.endswith("['router']") else leaf + noise)
    return jax.tree.unflatten(treedef, out)


def batch(cfg: ModelConfig, b: int = 4, t: int = 20, seed: int = 0):
    """tokens [B, T] and segment ids with right padding and two packed documents (B >= 3)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    segments = np.ones((b, t), np.int32)
    segments[1, t - 5 :] = 0
    segments[2, t // 2 :] = 2
    return jnp.asarray(tokens), jnp.asarray(segments)

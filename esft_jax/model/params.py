"""The parameter pytree: shapes, logical axis names and initialisers, declared once.

Layout (nested dicts; weights stored as `x @ w`, i.e. [in, out]; `L` = stacked layers):

    embed                [vocab, embed]
    final_norm           [embed]
    lm_head              [embed, vocab]          (absent when tie_word_embeddings)
    dense_layers/...     the first `first_k_dense_replace` layers, stacked on a leading `layers` axis
        attn_norm, mlp_norm [L, embed]
        attn/...         see `_attention_specs`
        mlp/gate, up [L, embed, mlp]; mlp/down [L, mlp, embed]
    moe_layers/...       the remaining layers, stacked the same way
        attn_norm, mlp_norm, attn/...
        moe/router       [L, embed, expert]     (float32, as the reference keeps it)
        moe/router_bias  [L, expert]            (DeepSeek-V3 only: e_score_correction_bias)
        moe/experts/gate, up [L, expert, embed, expert_mlp]; down [L, expert, expert_mlp, embed]
        moe/shared/gate, up  [L, embed, shared_mlp]; down [L, shared_mlp, embed]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from esft_jax.model.config import ModelConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dim
    init: str = "normal"  # "normal" (std 0.02), "ones" or "zeros"
    dtype: str | None = None  # None: the config's param_dtype


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def _attention_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    specs = {
        "kv_a": ParamSpec((d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora")),
        "kv_a_norm": ParamSpec((cfg.kv_lora_rank,), ("norm",), "ones"),
        "kv_b": ParamSpec((cfg.kv_lora_rank, h, cfg.qk_nope_head_dim + cfg.v_head_dim),
                          ("kv_lora", "heads", "head_dim")),
        "o": ParamSpec((h, cfg.v_head_dim, d), ("heads", "head_dim", "embed")),
    }
    if cfg.q_lora_rank is None:
        specs["q"] = ParamSpec((d, h, cfg.qk_head_dim), ("embed", "heads", "head_dim"))
    else:
        specs["q_a"] = ParamSpec((d, cfg.q_lora_rank), ("embed", "q_lora"))
        specs["q_a_norm"] = ParamSpec((cfg.q_lora_rank,), ("norm",), "ones")
        specs["q_b"] = ParamSpec((cfg.q_lora_rank, h, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"))
    return specs


def _mlp_specs(d: int, f: int, mlp_axis: str) -> dict[str, ParamSpec]:
    return {"gate": ParamSpec((d, f), ("embed", mlp_axis)),
            "up": ParamSpec((d, f), ("embed", mlp_axis)),
            "down": ParamSpec((f, d), (mlp_axis, "embed"))}


def _stack(specs: dict[str, Any], n: int) -> dict[str, Any]:
    """Prefix every spec with a `layers` axis of size n."""
    return jax.tree.map(lambda s: dataclasses.replace(s, shape=(n, *s.shape), axes=("layers", *s.axes)),
                        specs, is_leaf=_is_spec)


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The full parameter pytree, as ParamSpec leaves."""
    d, v, e = cfg.hidden_size, cfg.vocab_size, cfg.n_routed_experts
    norm = ParamSpec((d,), ("norm",), "ones")
    specs: dict[str, Any] = {"embed": ParamSpec((v, d), ("vocab", "embed")), "final_norm": norm}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((d, v), ("embed", "vocab"))
    block = {"attn_norm": norm, "attn": _attention_specs(cfg), "mlp_norm": norm}
    if cfg.first_k_dense_replace:
        dense = {**block, "mlp": _mlp_specs(d, cfg.intermediate_size, "mlp")}
        specs["dense_layers"] = _stack(dense, cfg.first_k_dense_replace)
    if cfg.num_moe_layers:
        f = cfg.moe_intermediate_size
        moe: dict[str, Any] = {
            "router": ParamSpec((d, e), ("embed", "expert"), dtype="float32"),
            "experts": {"gate": ParamSpec((e, d, f), ("expert", "embed", "expert_mlp")),
                        "up": ParamSpec((e, d, f), ("expert", "embed", "expert_mlp")),
                        "down": ParamSpec((e, f, d), ("expert", "expert_mlp", "embed"))},
        }
        if cfg.topk_method == "noaux_tc":
            moe["router_bias"] = ParamSpec((e,), ("expert",), "zeros", dtype="float32")
        if cfg.n_shared_experts:
            moe["shared"] = _mlp_specs(d, cfg.shared_intermediate_size, "mlp")
        specs["moe_layers"] = _stack({**block, "moe": moe}, cfg.num_moe_layers)
    return specs


def flat_param_specs(cfg: ModelConfig) -> dict[tuple[str, ...], ParamSpec]:
    """{key path: ParamSpec}, e.g. ("moe_layers", "moe", "experts", "gate") -> its spec."""
    flat, _ = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=_is_spec)
    return {tuple(k.key for k in keys): spec for keys, spec in flat}


def param_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Logical axis names, a pytree of tuples shaped like the params."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
    """jax.ShapeDtypeStruct leaves: the params without allocating them."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype or cfg.param_dtype)),
                        param_specs(cfg), is_leaf=_is_spec)


_INITS: dict[str, Callable[[jax.Array, tuple[int, ...], Any], jax.Array]] = {
    "normal": lambda key, shape, dtype: 0.02 * jax.random.normal(key, shape, dtype),
    "ones": lambda key, shape, dtype: jnp.ones(shape, dtype),
    "zeros": lambda key, shape, dtype: jnp.zeros(shape, dtype),
}


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random params (normal std 0.02 for matrices, ones for norms), one key per leaf."""
    leaves, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    arrays = [_INITS[s.init](k, s.shape, jnp.dtype(s.dtype or cfg.param_dtype)) for s, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, arrays)

"""The parameter pytree: shapes, logical axis names and initialisers, declared once.

Layout (nested dicts; weights stored as `x @ w`, i.e. [in, out]; `L` = stacked layers):

    embed                [vocab, embed]
    final_norm           [embed]
    lm_head              [embed, vocab]          (absent when tie_word_embeddings)
    dense_layers/...     the dense layers (cfg.dense_layer_ids), stacked on a leading `layers` axis
        attn_norm, mlp_norm [L, embed]
        attn/...         `_mla_specs` or `_gqa_specs`
        mlp/gate, up [L, embed, mlp]; mlp/down [L, mlp, embed]
    moe_layers/...       the MoE layers (cfg.moe_layer_ids), stacked the same way
        attn_norm, mlp_norm, attn/...
        moe/router       [L, embed, expert]     (float32, as the reference keeps it)
        moe/router_bias  [L, expert]            (a bias of the router logits, if cfg.router_bias)
        moe/router_correction [L, expert]       (noaux_tc: added to the scores for choosing only)
        moe/experts/gate, up [L, expert, embed, expert_mlp]; down [L, expert, expert_mlp, embed]
                   (+ gate_bias, up_bias [L, expert, expert_mlp], down_bias [L, expert, embed])
                   (cfg.expert_fp8_block: gate/up/down FP8, + gate_scale, up_scale, down_scale
                   [L, expert, in blocks, out blocks] float32: model/quant.py)
        moe/shared/gate, up  [L, embed, shared_mlp]; down [L, shared_mlp, embed]
        moe/shared_gate  [L, embed, 1]           (if cfg.shared_expert_gate)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from esft_jax.model import quant
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


# name endings of the leaves that are not linear weights
_VECTORS = (
    "norm",
    "bias",
    "correction",
    "sinks",
)


def input_dims(path: tuple[str, ...]) -> int | None:
    """How many leading dims (after any stacked layer/expert axes) of the leaf at `path` are a linear
    weight's inputs -- [in..., out...], as `x @ w` -- or None for a vector (norm, bias, ...).
    The embedding table [vocab, embed] is a lookup, not a weight of x @ w: 0."""
    if path == ("embed",):
        return 0
    if path[-1].endswith(_VECTORS):
        return None
    return 2 if path[-2:] == ("attn", "o") else 1  # o maps (heads, head_dim) -> embed


def _mla_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    specs = {
        "kv_a": ParamSpec((d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ("embed", "kv_lora")),
        "kv_a_norm": ParamSpec((cfg.kv_lora_rank,), ("norm",), "ones"),
        "kv_b": ParamSpec(
            (cfg.kv_lora_rank, h, cfg.qk_nope_head_dim + cfg.v_head_dim),
            ("kv_lora", "heads", "head_dim"),
        ),
        "o": ParamSpec((h, cfg.v_head_dim, d), ("heads", "head_dim", "embed")),
    }
    if cfg.q_lora_rank is None:
        specs["q"] = ParamSpec((d, h, cfg.qk_head_dim), ("embed", "heads", "head_dim"))
    else:
        specs["q_a"] = ParamSpec((d, cfg.q_lora_rank), ("embed", "q_lora"))
        specs["q_a_norm"] = ParamSpec((cfg.q_lora_rank,), ("norm",), "ones")
        specs["q_b"] = ParamSpec(
            (cfg.q_lora_rank, h, cfg.qk_head_dim), ("q_lora", "heads", "head_dim")
        )
    return specs


def _gqa_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.gqa_head_dim
    specs = {
        "q": ParamSpec((d, h, hd), ("embed", "heads", "head_dim")),
        "k": ParamSpec((d, kv, hd), ("embed", "kv_heads", "head_dim")),
        "v": ParamSpec((d, kv, hd), ("embed", "kv_heads", "head_dim")),
        "o": ParamSpec((h, hd, d), ("heads", "head_dim", "embed")),
    }
    if cfg.qkv_bias:
        specs.update(
            q_bias=ParamSpec((h, hd), ("heads", "head_dim"), "zeros"),
            k_bias=ParamSpec((kv, hd), ("kv_heads", "head_dim"), "zeros"),
            v_bias=ParamSpec((kv, hd), ("kv_heads", "head_dim"), "zeros"),
        )
    if cfg.o_bias:
        specs["o_bias"] = ParamSpec((d,), ("embed",), "zeros")
    if cfg.qk_norm == "head":
        specs.update(
            q_norm=ParamSpec((hd,), ("norm",), "ones"), k_norm=ParamSpec((hd,), ("norm",), "ones")
        )
    elif cfg.qk_norm == "full":
        specs.update(
            q_norm=ParamSpec((h, hd), ("heads", "head_dim"), "ones"),
            k_norm=ParamSpec((kv, hd), ("kv_heads", "head_dim"), "ones"),
        )
    if cfg.attention_sinks:
        specs["sinks"] = ParamSpec((h,), ("heads",), "zeros", dtype="float32")
    return specs


def _mlp_specs(d: int, f: int, mlp_axis: str) -> dict[str, ParamSpec]:
    return {
        "gate": ParamSpec((d, f), ("embed", mlp_axis)),
        "up": ParamSpec((d, f), ("embed", mlp_axis)),
        "down": ParamSpec((f, d), (mlp_axis, "embed")),
    }


def _expert_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Stacked routed experts: gate, up [E, d, f]; down [E, f, d]; biases [E, f] / [E, d]."""
    d, e, f = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    specs = {
        "gate": ParamSpec((e, d, f), ("expert", "embed", "expert_mlp")),
        "up": ParamSpec((e, d, f), ("expert", "embed", "expert_mlp")),
        "down": ParamSpec((e, f, d), ("expert", "expert_mlp", "embed")),
    }
    if cfg.expert_fp8_block:  # FP8 values and a float32 scale per block (model/quant.py)
        block = quant.block_io(cfg.expert_fp8_block)
        for name in quant.QUANTIZED:
            spec = specs[name]
            specs[name] = dataclasses.replace(spec, dtype=quant.FP8)
            specs[name + quant.SCALE] = ParamSpec(
                quant.scale_shape(spec.shape, block), ("expert", None, None), "ones", "float32"
            )
    if cfg.expert_bias:
        specs.update(
            gate_bias=ParamSpec((e, f), ("expert", "expert_mlp"), "zeros"),
            up_bias=ParamSpec((e, f), ("expert", "expert_mlp"), "zeros"),
            down_bias=ParamSpec((e, d), ("expert", "embed"), "zeros"),
        )
    return specs


def _moe_specs(cfg: ModelConfig) -> dict[str, Any]:
    d, e = cfg.hidden_size, cfg.n_routed_experts
    moe: dict[str, Any] = {
        "router": ParamSpec((d, e), ("embed", "expert"), dtype="float32"),  # as the reference
        "experts": _expert_specs(cfg),
    }
    if cfg.router_bias:
        moe["router_bias"] = ParamSpec((e,), ("expert",), "zeros", dtype="float32")
    if cfg.topk_method == "noaux_tc":
        moe["router_correction"] = ParamSpec((e,), ("expert",), "zeros", dtype="float32")
    if cfg.shared_intermediate_size:
        moe["shared"] = _mlp_specs(d, cfg.shared_intermediate_size, "mlp")
        if cfg.shared_expert_gate:
            moe["shared_gate"] = ParamSpec((d, 1), ("embed", None))
    return moe


def _stack(specs: dict[str, Any], n: int) -> dict[str, Any]:
    """Prefix every spec with a `layers` axis of size n."""
    return jax.tree.map(
        lambda s: dataclasses.replace(s, shape=(n, *s.shape), axes=("layers", *s.axes)),
        specs,
        is_leaf=_is_spec,
    )


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The full parameter pytree, as ParamSpec leaves."""
    d, v = cfg.hidden_size, cfg.vocab_size
    norm = ParamSpec((d,), ("norm",), "ones")
    specs: dict[str, Any] = {"embed": ParamSpec((v, d), ("vocab", "embed")), "final_norm": norm}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((d, v), ("embed", "vocab"))
    attn = _mla_specs(cfg) if cfg.attention == "mla" else _gqa_specs(cfg)
    block = {"attn_norm": norm, "attn": attn, "mlp_norm": norm}
    if cfg.dense_layer_ids:
        dense = {**block, "mlp": _mlp_specs(d, cfg.intermediate_size, "mlp")}
        specs["dense_layers"] = _stack(dense, len(cfg.dense_layer_ids))
    if cfg.moe_layer_ids:
        specs["moe_layers"] = _stack({**block, "moe": _moe_specs(cfg)}, cfg.num_moe_layers)
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
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype or cfg.param_dtype)),
        param_specs(cfg),
        is_leaf=_is_spec,
    )


_INITS: dict[str, Callable[[jax.Array, tuple[int, ...], Any], jax.Array]] = {
    "normal": lambda key, shape, dtype: 0.02 * jax.random.normal(key, shape, dtype),
    "ones": lambda key, shape, dtype: jnp.ones(shape, dtype),
    "zeros": lambda key, shape, dtype: jnp.zeros(shape, dtype),
}


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random params (normal std 0.02 for matrices, ones for norms), one key per leaf."""
    leaves, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))

    def init(s: ParamSpec, key: jax.Array) -> jax.Array:
        dtype = jnp.dtype(s.dtype or cfg.param_dtype)
        if dtype == quant.FP8:  # random FP8 values: drawn in float32, rounded
            return _INITS[s.init](key, s.shape, jnp.float32).astype(dtype)
        return _INITS[s.init](key, s.shape, dtype)

    arrays = [init(s, k) for s, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, arrays)

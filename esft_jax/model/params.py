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
                   (cfg.expert_scheme: gate/up/down its values, + gate_scale, up_scale,
                   down_scale its scales: model/quant.py)
        moe/shared/gate, up  [L, embed, shared_mlp]; down [L, shared_mlp, embed]
        moe/shared_gate  [L, embed, 1]           (if cfg.shared_expert_gate)
    (cfg.linear_fp8: attn's, mlp's and moe/shared's matrices FP8 in their shapes, + `<name>_scale`
    [L, in blocks, out blocks] float32 over their [in, out] view: FP8_LINEARS)
"""

from __future__ import annotations

import dataclasses
import math
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


# The linear weights of a layer that a fine-grained FP8 checkpoint stores in FP8 beside its experts
# (cfg.linear_fp8), by the group that holds them; the router stays float32.
FP8_LINEARS = {
    "attn": ("q", "k", "v", "o", "q_a", "q_b", "kv_a", "kv_b"),
    "mlp": ("gate", "up", "down"),
    "shared": ("gate", "up", "down"),
}


def is_fp8_linear(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-1] in FP8_LINEARS.get(path[-2], ())


def _linear_io(group: str, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """A linear weight's 2-D [in, out] view (its inputs the leading `input_dims`)."""
    n_in = input_dims((group, name))
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def _fp8_linear_specs(specs: dict[str, ParamSpec], group: str, cfg: ModelConfig) -> dict:
    """`specs` with its FP8_LINEARS in FP8 (their shape and axes as before) and a float32 scale
    grid `<name>_scale` over their 2-D [in, out] view (model/quant.py)."""
    if not cfg.linear_fp8:
        return specs
    scheme = quant.Fp8Blocks(quant.block_io(cfg.expert_fp8_block))
    out = dict(specs)
    for name in FP8_LINEARS[group]:
        if name in specs:
            spec = specs[name]
            grid = scheme.shapes(_linear_io(group, name, spec.shape))[1]
            out[name] = dataclasses.replace(spec, init="quantized", dtype=quant.FP8)
            out[name + quant.SCALE] = ParamSpec(grid, (None, None), "ones", "float32")
    return out


def dequantize_linears(p: Params, cfg: ModelConfig) -> Params:
    """One layer's params with its FP8 linears (cfg.linear_fp8) dequantised to param_dtype, as a
    bf16 load of the checkpoint holds them: inside the layer loop, one layer's at a time."""
    if not cfg.linear_fp8:
        return p
    scheme = quant.Fp8Blocks(quant.block_io(cfg.expert_fp8_block))

    def group(weights: Params, name: str) -> Params:
        out = {}
        for k, w in weights.items():
            if k.endswith(quant.SCALE):
                continue
            if k + quant.SCALE in weights and w.dtype == jnp.dtype(quant.FP8):
                view = w.reshape(_linear_io(name, k, w.shape))
                w = scheme.dequantize(view, weights[k + quant.SCALE], cfg.param_dtype)
                w = w.reshape(weights[k].shape)
            out[k] = w
        return out

    out = {**p, "attn": group(p["attn"], "attn")}
    if "mlp" in p:
        out["mlp"] = group(p["mlp"], "mlp")
    if "shared" in p.get("moe", {}):
        out["moe"] = {**p["moe"], "shared": group(p["moe"]["shared"], "shared")}
    return out


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
    scheme = cfg.expert_scheme
    if scheme is not None:  # the scheme's values and scales (model/quant.py)
        for name in quant.QUANTIZED:
            spec = specs[name]
            values, scale = scheme.shapes(spec.shape)
            fp8 = isinstance(scheme, quant.Fp8Blocks)  # its scales: a grid of blocks
            specs[name] = ParamSpec(values, spec.axes, "quantized", scheme.values_dtype)
            specs[name + quant.SCALE] = ParamSpec(
                scale,
                ("expert", None, None if fp8 else spec.axes[-1]),
                "ones" if fp8 else "e8m0",
                scheme.scale_dtype,
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
        shared = _mlp_specs(d, cfg.shared_intermediate_size, "mlp")
        moe["shared"] = _fp8_linear_specs(shared, "shared", cfg)
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
    block = {"attn_norm": norm, "attn": _fp8_linear_specs(attn, "attn", cfg), "mlp_norm": norm}
    if cfg.dense_layer_ids:
        mlp = _fp8_linear_specs(_mlp_specs(d, cfg.intermediate_size, "mlp"), "mlp", cfg)
        dense = {**block, "mlp": mlp}
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
    "e8m0": lambda key, shape, dtype: jnp.full(shape, 120, dtype),  # MXFP4 scales: 2^-7
    "quantized": lambda key, shape, dtype: (  # MXFP4: random codes; FP8: normal, rounded
        jax.random.bits(key, shape, jnp.uint8)
        if dtype == jnp.uint8
        else (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    ),
}


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random params (normal std 0.02 for matrices, ones for norms), one key per leaf."""
    leaves, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))

    def init(s: ParamSpec, key: jax.Array) -> jax.Array:
        return _INITS[s.init](key, s.shape, jnp.dtype(s.dtype or cfg.param_dtype))

    arrays = [init(s, k) for s, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, arrays)

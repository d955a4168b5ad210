"""What every model family's checkpoint module provides, and the pieces families share.

A `Family` says, for one Hugging Face `model_type`: how its `config.json` maps onto ModelConfig
(both ways), the Hugging Face name of each of our per-layer tensors (`names`, routed experts one
tensor per expert: the canonical names, which adapters use too), and the fused layouts or other
names its files may hold instead (`read_fused`, `read_renames`) or that its Hub checkpoints use
(`write_fused`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from esft_jax.model.config import DTYPES, ConfigError, ModelConfig

Names = Mapping[tuple[str, ...], str]  # our per-layer path -> HF suffix after "model.layers.{l}."


@dataclasses.dataclass(frozen=True)
class Fused:
    """One file tensor `model.layers.{l}.<name>` [E, ...] holding a per-expert tensor of every expert
    of the layer (`parts`: canonical suffixes with `{e}`, in HF [out, in] convention).

    `split(t_e)` takes expert e's slice and returns its parts; `join(parts)` is the inverse.
    """

    name: str
    parts: tuple[str, ...]
    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    join: Callable[[tuple[np.ndarray, ...]], np.ndarray]


def _halves(t: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.split(t, 2, axis=0))


def _transposed_interleaved(t: np.ndarray) -> tuple[np.ndarray, ...]:
    return t[..., 0::2].T, t[..., 1::2].T


def _interleave(parts: tuple[np.ndarray, ...]) -> np.ndarray:
    gate, up = parts
    return np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1)


def transformers_fused(prefix: str, gate: str, up: str, down: str) -> tuple[Fused, ...]:
    """transformers 5's in-memory layout (what a model's `state_dict()` holds): gate_up [E, 2f, d],
    gate rows first; down [E, d, f]. `prefix` + gate/up/down: the canonical per-expert suffixes."""
    return (
        Fused(
            "mlp.experts.gate_up_proj",
            (prefix + gate, prefix + up),
            _halves,
            lambda p: np.concatenate(p, axis=0),
        ),
        Fused("mlp.experts.down_proj", (prefix + down,), lambda t: (t,), lambda p: p[0]),
    )


# The fused layout of every family whose experts are mlp.experts.{e}.{gate,up,down}_proj.
MLP_FUSED = transformers_fused(
    "mlp.experts.{e}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"
)


def gpt_oss_fused() -> tuple[Fused, ...]:
    """gpt-oss: gate_up [E, d, 2f] as x @ w with gate and up columns interleaved, biases [E, 2f];
    down [E, f, d], bias [E, d]."""
    e = "mlp.experts.{e}."
    return (
        Fused(
            "mlp.experts.gate_up_proj",
            (e + "gate_proj.weight", e + "up_proj.weight"),
            _transposed_interleaved,
            lambda p: _interleave(tuple(w.T for w in p)),
        ),
        Fused(
            "mlp.experts.gate_up_proj_bias",
            (e + "gate_proj.bias", e + "up_proj.bias"),
            lambda t: (t[0::2], t[1::2]),
            _interleave,
        ),
        Fused(
            "mlp.experts.down_proj", (e + "down_proj.weight",), lambda t: (t.T,), lambda p: p[0].T
        ),
        Fused(
            "mlp.experts.down_proj_bias", (e + "down_proj.bias",), lambda t: (t,), lambda p: p[0]
        ),
    )


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class in config.json's "architectures"
    names: Names
    from_hf: Callable[[Mapping[str, Any]], dict[str, Any]]  # config.json -> ModelConfig fields
    to_hf: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> config.json
    read_fused: tuple[Fused, ...] = ()
    write_fused: tuple[Fused, ...] = ()
    # file suffix -> canonical
    read_renames: Mapping[str, str] = dataclasses.field(default_factory=dict)


# Names most families share.
NORMS = {("attn_norm",): "input_layernorm.weight", ("mlp_norm",): "post_attention_layernorm.weight"}
DENSE_MLP = {
    ("mlp", "gate"): "mlp.gate_proj.weight",
    ("mlp", "up"): "mlp.up_proj.weight",
    ("mlp", "down"): "mlp.down_proj.weight",
}
GQA = (
    {("attn", w): f"self_attn.{w}_proj.weight" for w in "qkvo"}
    | {("attn", f"{w}_bias"): f"self_attn.{w}_proj.bias" for w in "qkvo"}
    | {
        ("attn", "q_norm"): "self_attn.q_norm.weight",
        ("attn", "k_norm"): "self_attn.k_norm.weight",
        ("attn", "sinks"): "self_attn.sinks",
    }
)


def experts(
    prefix: str = "mlp.experts.{e}.",
    gate: str = "gate_proj",
    up: str = "up_proj",
    down: str = "down_proj",
) -> dict[tuple[str, ...], str]:
    """Per-expert names of the routed experts' weights and biases."""
    out = {}
    for ours, theirs in (("gate", gate), ("up", up), ("down", down)):
        out[("moe", "experts", ours)] = f"{prefix}{theirs}.weight"
        out[("moe", "experts", f"{ours}_bias")] = f"{prefix}{theirs}.bias"
    return out


def shared_mlp(prefix: str) -> dict[tuple[str, ...], str]:
    return {("moe", "shared", w): f"{prefix}.{w}_proj.weight" for w in ("gate", "up", "down")}


_COMMON_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def require(hf: Mapping[str, Any], keys: tuple[str, ...] = ()) -> None:
    """config.json must have every key every family needs, and the family's `keys`: else one
    error naming all."""
    missing = [k for k in (*_COMMON_REQUIRED, *keys) if hf.get(k) is None]
    if missing:
        raise ConfigError(f"config.json lacks required keys {missing}")


def dtype_name(name: Any) -> str:
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(
            f"dtype {name!r} in config.json is not supported; expected one of {DTYPES}"
        )
    return name


def common_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Fields every family's config.json spells the same way (rope included)."""
    require(hf)
    eos, eos_ids = hf.get("eos_token_id"), ()
    if isinstance(eos, list):  # several (GLM-4.5: three): the first is the one training appends
        eos, eos_ids = (eos[0] if eos else None), tuple(eos)
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    return dict(
        model_type=hf["model_type"],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        param_dtype=dtype_name(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_type=rope.get("rope_type", rope.get("type", "default")),
        rope_factor=float(rope.get("factor") or 1.0),
        rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"),
        rope_beta_fast=float(rope.get("beta_fast") or 32.0),
        rope_beta_slow=float(rope.get("beta_slow") or 1.0),
        rope_mscale=rope.get("mscale"),
        rope_mscale_all_dim=rope.get("mscale_all_dim"),
        rope_attention_factor=rope.get("attention_factor"),
        rope_truncate=bool(rope.get("truncate", True)),
        partial_rotary_factor=float(
            rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        ),
    )


def gqa_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    heads = hf["num_attention_heads"]
    return dict(
        attention="gqa",
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_interleave=False,
    )


def common_hf(cfg: ModelConfig, architecture: str) -> dict[str, Any]:
    """The config.json entries of `common_fields`, in transformers 5's layout."""
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    if cfg.rope_type == "yarn":
        rope.update(
            factor=cfg.rope_factor,
            beta_fast=cfg.rope_beta_fast,
            beta_slow=cfg.rope_beta_slow,
            original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
        )
        optional = dict(
            mscale=cfg.rope_mscale,
            mscale_all_dim=cfg.rope_mscale_all_dim,
            attention_factor=cfg.rope_attention_factor,
        )
        rope.update({k: v for k, v in optional.items() if v is not None})
        if not cfg.rope_truncate:
            rope["truncate"] = False
    return {
        "architectures": [architecture],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) or cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "hidden_act": "silu",
        "dtype": cfg.param_dtype,
    }


def gqa_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"num_key_value_heads": cfg.kv_heads, "head_dim": cfg.gqa_head_dim}


def gqa_moe_fields(hf: Mapping[str, Any], experts_key: str = "num_local_experts") -> dict[str, Any]:
    """Our fields of a model whose every layer is GQA and MoE, without shared experts (Mixtral, OLMoE,
    gpt-oss): `common_fields`, GQA's, and the routed experts (width, count under `experts_key`,
    top-k), whose keys are required."""
    require(hf, ("intermediate_size", experts_key, "num_experts_per_tok"))
    return dict(
        common_fields(hf),
        **gqa_fields(hf),
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["intermediate_size"],
        first_k_dense_replace=0,
        n_routed_experts=hf[experts_key],
        num_experts_per_tok=hf["num_experts_per_tok"],
        n_shared_experts=0,
    )


def gqa_moe_hf(
    cfg: ModelConfig, architecture: str, experts_key: str = "num_local_experts", **extra: Any
) -> dict[str, Any]:
    """`common_hf` + GQA + the routed experts (width, count under `experts_key`, top-k) + `extra`:
    the config.json of a model whose every layer is GQA and MoE (Mixtral, OLMoE, gpt-oss)."""
    hf = common_hf(cfg, architecture)
    hf.update(
        gqa_hf(cfg),
        intermediate_size=cfg.moe_intermediate_size,
        num_experts_per_tok=cfg.num_experts_per_tok,
        **{experts_key: cfg.n_routed_experts},
        **extra,
    )
    return hf


def layer_types(cfg: ModelConfig) -> list[str]:
    sliding = set(cfg.sliding_window_layers)
    return [
        "sliding_attention" if layer in sliding else "full_attention"
        for layer in range(cfg.num_hidden_layers)
    ]


def sliding_layers(hf: Mapping[str, Any], default: list[str] | None = None) -> dict[str, Any]:
    """sliding_window / sliding_window_layers from `layer_types` (or the family's default for it)."""
    types = hf.get("layer_types") or default or []
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return dict(
        sliding_window=hf.get("sliding_window") if layers else None, sliding_window_layers=layers
    )

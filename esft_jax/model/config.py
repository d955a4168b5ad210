"""Model configuration: one frozen, hashable dataclass (a static argument of `jax.jit`).

Field names follow the Hugging Face DeepSeek configs so that a `config.json` maps onto it almost
one to one. `from_hf_dict` reads both the remote-code era layout of the Hub checkpoints
(`rope_scaling`, top-level `rope_theta`, `scoring_func`) and the transformers 5 layout
(`rope_parameters`); `to_hf_dict` writes the transformers 5 layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
MOE_STRATEGIES = ("auto", "dense", "capacity", "blocked", "spill", "ragged")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A model configuration that cannot describe a model we can build."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str = "deepseek_v2"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128  # width of the dense SwiGLU layers
    moe_intermediate_size: int = 32  # width of one routed expert (and of one shared expert)
    num_hidden_layers: int = 3
    first_k_dense_replace: int = 1  # the first k layers are dense, the rest MoE
    num_attention_heads: int = 4
    # Multi-head latent attention.
    q_lora_rank: int | None = None  # None: a plain q_proj
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 8
    qk_rope_head_dim: int = 8
    v_head_dim: int = 8
    # Routing.
    n_routed_experts: int = 16
    n_shared_experts: int = 2
    num_experts_per_tok: int = 4
    scoring_func: str = "softmax"  # "softmax" (V2) or "sigmoid" (V3)
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" (V2) | "noaux_tc" (V3)
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # RoPE; rope_type "default" or "yarn".
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int | None = None
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_interleave: bool = True  # DeepSeek rotates adjacent pairs (x0, x1), (x2, x3), ...
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Runtime choices (not part of the checkpoint).
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; router scores are always float32
    moe_strategy: str = "auto"  # "auto" picks per backend, see model/moe.py
    capacity_factor: float | None = None  # capacity buffers and all_to_all exchange; None: dropless
    expert_parallel: str = "psum"  # how tokens meet experts on an `expert` mesh axis: psum | all_to_all
    scan_layers: bool = True  # lax.scan over the stacked layers (compiles one layer); False: a Python loop
    remat: bool = False  # recompute each layer in the backward pass: activations of one layer, not all

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        check(self.model_type in MODEL_TYPES,
              f"model_type {self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
        check(self.moe_strategy in MOE_STRATEGIES,
              f"moe_strategy {self.moe_strategy!r}; expected one of {MOE_STRATEGIES}")
        check(self.expert_parallel in ("psum", "all_to_all"),
              f"expert_parallel {self.expert_parallel!r}; expected 'psum' or 'all_to_all'")
        check(self.dtype in DTYPES and self.param_dtype in DTYPES,
              f"dtype/param_dtype must be one of {DTYPES}, got {self.dtype!r}/{self.param_dtype!r}")
        check(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
              "first_k_dense_replace must lie in [0, num_hidden_layers]")
        check(1 <= self.num_experts_per_tok <= self.n_routed_experts,
              "num_experts_per_tok must lie in [1, n_routed_experts]")
        check(self.scoring_func in ("softmax", "sigmoid"), f"scoring_func {self.scoring_func!r}")
        check(self.topk_method in ("greedy", "group_limited_greedy", "noaux_tc"),
              f"topk_method {self.topk_method!r}")
        check(self.rope_type in ("default", "yarn"), f"rope_type {self.rope_type!r} is not supported")
        check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
        if self.topk_method != "greedy":
            check(self.n_group is not None and self.topk_group is not None,
                  f"topk_method {self.topk_method!r} needs n_group and topk_group")
            check(self.n_routed_experts % self.n_group == 0, "n_group must divide n_routed_experts")
            check(1 <= self.topk_group <= self.n_group, "topk_group must lie in [1, n_group]")

    # Derived sizes.
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # Conversions.
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """From a flat dict of our own field names (e.g. an ml_collections config's `to_dict()`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}")
        return cls(**dict(d))

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **runtime: Any) -> "ModelConfig":
        """From a Hugging Face `config.json` dict, either layout; `runtime` sets dtype/strategy fields."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} in config.json is not supported; "
                              f"expected one of {MODEL_TYPES}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok")
        missing = [k for k in required if hf.get(k) is None]
        if missing:
            raise ConfigError(f"config.json lacks required keys {missing}")
        heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads")
        if kv_heads is not None and kv_heads != heads and model_type == "deepseek_v2":
            raise ConfigError(f"num_key_value_heads={kv_heads} != num_attention_heads={heads}: "
                              "MLA expands keys and values to every head")
        is_v3 = model_type == "deepseek_v3"
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        eos = hf.get("eos_token_id")
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            num_attention_heads=heads,
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            n_routed_experts=hf["n_routed_experts"],
            n_shared_experts=hf.get("n_shared_experts") or 0,
            num_experts_per_tok=hf["num_experts_per_tok"],
            scoring_func=hf.get("scoring_func", "sigmoid" if is_v3 else "softmax"),
            topk_method="noaux_tc" if is_v3 else (hf.get("topk_method") or "greedy"),
            n_group=hf.get("n_group") or (1 if is_v3 else None),
            topk_group=hf.get("topk_group") or (1 if is_v3 else None),
            norm_topk_prob=bool(hf.get("norm_topk_prob", is_v3)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            rope_theta=float(rope_theta),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor") or 1.0),
            rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"),
            rope_beta_fast=float(rope.get("beta_fast") or 32.0),
            rope_beta_slow=float(rope.get("beta_slow") or 1.0),
            rope_mscale=rope.get("mscale"),
            rope_mscale_all_dim=rope.get("mscale_all_dim"),
            rope_interleave=bool(hf.get("rope_interleave", True)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            param_dtype=_dtype_name(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
        )
        fields.update(runtime)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers 5 `config.json` dict for this model."""
        is_v3 = self.model_type == "deepseek_v3"
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "yarn":
            rope.update(factor=self.rope_factor, beta_fast=self.rope_beta_fast,
                        beta_slow=self.rope_beta_slow,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings)
            if self.rope_mscale is not None:
                rope["mscale"] = self.rope_mscale
            if self.rope_mscale_all_dim is not None:
                rope["mscale_all_dim"] = self.rope_mscale_all_dim
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if is_v3 else "DeepseekV2ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "first_k_dense_replace": self.first_k_dense_replace,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "dtype": self.param_dtype,
        }
        if is_v3:
            hf.update(rope_interleave=self.rope_interleave, num_nextn_predict_layers=0)
        else:
            hf.update(topk_method=self.topk_method)
        return hf


def _dtype_name(name: str) -> str:
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} in config.json is not supported; expected one of {DTYPES}")
    return name

"""Model configuration: one frozen, hashable dataclass (a static argument of `jax.jit`).

It describes the model by its parts, not by its family: the attention kind (MLA or grouped-query
with its options), the router, the expert MLP, the shared experts, which layers are MoE and which
use a sliding window. Each Hugging Face family's `config.json` maps onto these fields in
`esft_jax/checkpoint/families/`; `model_type` is only a label the checkpoint code dispatches on.
Field names follow the Hugging Face configs where one exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from esft_jax.errors import UserError
from esft_jax.model import quant

MOE_STRATEGIES = ("auto", "dense", "capacity", "blocked", "spill", "ragged", "tokamax")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("mla", "gqa")
QK_NORMS = (None, "head", "full")  # RMSNorm of each head's q/k, or of the whole q/k projection
EXPERT_ACTS = ("swiglu", "clamped_swiglu")
# softmax(q k^T) v (model/attention.py): "reference" (float32 scores [B, H, T, S]),
# jax.nn.dot_product_attention with JAX's choice of kernel ("dot_product"), or exact attention in
# blocks of `attention_block` queries x keys that never holds the scores ("blockwise")
ATTENTION_IMPLS = ("reference", "dot_product", "blockwise")
# the router's gradient (model/router_grad.py): of the top-k mixture the forward computes
# ("sparse"), or of the dense mixture over every expert, the forward unchanged ("dense": DenseMixer)
ROUTER_GRADS = ("sparse", "dense")


class ConfigError(UserError, ValueError):
    """A model configuration that cannot describe a model we can build."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str = "deepseek_v2"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128  # width of the dense SwiGLU layers
    moe_intermediate_size: int = 32  # width of one routed expert
    num_hidden_layers: int = 3
    # Which layers are MoE: layer l is MoE iff l >= first_k_dense_replace, (l + 1) % moe_layer_step == 0
    # and l is not in mlp_only_layers; the others are dense SwiGLU layers.
    first_k_dense_replace: int = 1
    moe_layer_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    num_attention_heads: int = 4
    attention: str = "mla"
    # Multi-head latent attention.
    q_lora_rank: int | None = None  # None: a plain q_proj
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 8
    qk_rope_head_dim: int = 8  # MLA: the rotated slice of each head
    v_head_dim: int = 8
    # Grouped-query attention.
    num_key_value_heads: int | None = None  # None: as many as query heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    partial_rotary_factor: float = 1.0  # the first fraction of each head is rotated
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None
    clip_qkv: float | None = None  # clamp q, k, v projections to [-clip, clip]
    attention_sinks: bool = False  # a learned per-head logit in every softmax's denominator
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] = ()  # layers that attend within the window only
    # Routing.
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    scoring_func: str = "softmax"  # "softmax" or "sigmoid"
    # "greedy" | "group_limited_greedy" | "noaux_tc" (choice bias, groups)
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # False: normalise *or* scale (DeepSeek-V2's original gate)
    scale_normalised_weights: bool = True
    router_bias: bool = False  # a learned bias added to the router logits
    # Experts.
    # "swiglu", or "clamped_swiglu": clamp at swiglu_limit, gate * sigmoid(alpha gate) * (up + 1)
    expert_act: str = "swiglu"
    expert_bias: bool = False
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    n_shared_experts: int = 2
    # None: n_shared_experts * moe_intermediate_size
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False  # scale the shared experts' output by sigmoid(x @ w) [d, 1]
    # RoPE; rope_type "default" or "yarn".
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int | None = None
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_attention_factor: float | None = None  # None: YaRN's own from factor (and mscales)
    rope_truncate: bool = True  # YaRN: round the correction range to whole dims
    # rotate adjacent pairs (x0, x1), ...; False: halves (x_i, x_{i+r/2})
    rope_interleave: bool = True
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None  # the one training appends after an answer
    # config.json's list of EOS ids, where it has one (GLM-4.5: three), eos_token_id its first; a
    # generation stops at any of them (`stop_token_ids`).
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # The routed experts held quantised (model/quant.py): in fine-grained FP8, the file's block
    # [rows, cols] of its [out, in] matrices, e.g. (128, 128); in MXFP4 (gpt-oss); else param_dtype.
    expert_fp8_block: tuple[int, ...] = ()
    expert_mxfp4: bool = False
    # The layers' other linear weights (attention, dense and shared MLPs) held in FP8 too, in
    # expert_fp8_block blocks (model/params.py FP8_LINEARS)
    linear_fp8: bool = False
    # Runtime choices (not part of the checkpoint).
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; router scores are always float32
    moe_strategy: str = "auto"  # "auto" picks per backend, see model/moe.py
    capacity_factor: float | None = None  # capacity buffers and all_to_all exchange; None: dropless
    # how tokens meet experts on an `expert` mesh axis: psum | all_to_all
    expert_parallel: str = "psum"
    # lax.scan over the stacked layers (compiles one layer); False: a Python loop
    scan_layers: bool = True
    # recompute each layer in the backward pass: activations of one layer, not all
    remat: bool = False
    # what a checkpoint's frozen quantised experts load as: "native" keeps them as stored
    # (expert_fp8_block / expert_mxfp4 set from the checkpoint), "bfloat16" dequantises them
    frozen_dtype: str = "bfloat16"
    attention_impl: str = "reference"  # ATTENTION_IMPLS
    attention_block: int = 512  # blockwise: queries and keys per block
    router_grad: str = "sparse"  # ROUTER_GRADS

    def __post_init__(self) -> None:
        for name in (
            "mlp_only_layers",
            "sliding_window_layers",
            "eos_token_ids",
            "expert_fp8_block",
        ):  # lists from JSON / ml_collections
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        def one_of(name: str, allowed: tuple) -> None:
            check(
                getattr(self, name) in allowed,
                f"{name} {getattr(self, name)!r}; expected one of {allowed}",
            )

        one_of("moe_strategy", MOE_STRATEGIES)
        one_of("expert_parallel", ("psum", "all_to_all"))
        one_of("dtype", DTYPES)
        one_of("param_dtype", DTYPES)
        one_of("attention", ATTENTIONS)
        one_of("attention_impl", ATTENTION_IMPLS)
        one_of("router_grad", ROUTER_GRADS)
        one_of("frozen_dtype", ("bfloat16", "native"))
        one_of("qk_norm", QK_NORMS)
        one_of("expert_act", EXPERT_ACTS)
        one_of("scoring_func", ("softmax", "sigmoid"))
        one_of("topk_method", ("greedy", "group_limited_greedy", "noaux_tc"))
        one_of("rope_type", ("default", "yarn"))
        check(
            not self.eos_token_ids or self.eos_token_ids[0] == self.eos_token_id,
            f"eos_token_id {self.eos_token_id} must be the first of eos_token_ids "
            f"{list(self.eos_token_ids)}",
        )
        layers = range(self.num_hidden_layers)
        check(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace must lie in [0, num_hidden_layers]",
        )
        check(self.moe_layer_step >= 1, "moe_layer_step must be at least 1")
        check(self.attention_block >= 1, "attention_block must be at least 1")
        check(
            not self.expert_fp8_block
            or (len(self.expert_fp8_block) == 2 and min(self.expert_fp8_block) >= 1),
            f"expert_fp8_block {list(self.expert_fp8_block)}: expected [] or two positive sizes",
        )
        check(
            not (self.expert_fp8_block and self.expert_mxfp4),
            "expert_fp8_block and expert_mxfp4: the experts are one or the other",
        )
        check(
            not self.linear_fp8 or bool(self.expert_fp8_block),
            "linear_fp8 needs expert_fp8_block (the FP8 block of the checkpoint)",
        )
        if self.expert_mxfp4:
            check(
                self.hidden_size % 32 == 0 and self.moe_intermediate_size % 32 == 0,
                "expert_mxfp4 needs hidden_size and moe_intermediate_size multiples of 32",
            )
        check(
            all(layer in layers for layer in self.mlp_only_layers + self.sliding_window_layers),
            f"mlp_only_layers / sliding_window_layers must lie in [0, {self.num_hidden_layers})",
        )
        check(
            not self.sliding_window_layers or (self.sliding_window or 0) > 0,
            "sliding_window_layers needs a positive sliding_window",
        )
        check(
            1 <= self.num_experts_per_tok <= self.n_routed_experts,
            "num_experts_per_tok must lie in [1, n_routed_experts]",
        )
        check(self.rotary_dim % 2 == 0, f"the rotated head dim ({self.rotary_dim}) must be even")
        if self.attention == "gqa":
            check(
                self.num_attention_heads % self.kv_heads == 0,
                f"num_key_value_heads={self.kv_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}",
            )
        if self.topk_method != "greedy":
            check(
                self.n_group is not None and self.topk_group is not None,
                f"topk_method {self.topk_method!r} needs n_group and topk_group",
            )
            check(self.n_routed_experts % self.n_group == 0, "n_group must divide n_routed_experts")
            check(1 <= self.topk_group <= self.n_group, "topk_group must lie in [1, n_group]")

    # The layer pattern, in one place.
    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Model layer index of every MoE layer, ascending (the keys of an expert config)."""
        return tuple(
            layer
            for layer in range(self.num_hidden_layers)
            if layer >= self.first_k_dense_replace
            and (layer + 1) % self.moe_layer_step == 0
            and layer not in self.mlp_only_layers
        )

    @property
    def dense_layer_ids(self) -> tuple[int, ...]:
        moe = set(self.moe_layer_ids)
        return tuple(layer for layer in range(self.num_hidden_layers) if layer not in moe)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The ids that end a generation: eos_token_ids, or eos_token_id alone (none if unset)."""
        if self.eos_token_ids:
            return self.eos_token_ids
        return () if self.eos_token_id is None else (self.eos_token_id,)

    # Derived sizes.
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """Width of one head's query/key."""
        return (
            self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.attention == "mla"
            else self.gqa_head_dim
        )

    @property
    def rotary_dim(self) -> int:
        """Rotated width of each query/key head."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.gqa_head_dim * self.partial_rotary_factor)

    @property
    def shared_intermediate_size(self) -> int:
        """Width of the shared-expert MLP (0: no shared experts)."""
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def expert_scheme(self) -> quant.Scheme | None:
        """How the routed experts are held quantised (model/quant.py); None: in param_dtype."""
        return quant.expert_scheme(self.expert_fp8_block, self.expert_mxfp4)

    def unquantized(self) -> ModelConfig:
        """The same model with every weight held in param_dtype."""
        return self.replace(expert_fp8_block=(), expert_mxfp4=False, linear_fp8=False)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """From a flat dict of our own field names (e.g. an ml_collections config's `to_dict()`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}")
        return cls(**dict(d))

"""Tiny random MoE models of every supported family built with transformers (the reference), saved to disk.

Sizes are small and deliberately uneven (odd expert counts, head_dim decoupled from hidden / heads) so
that a transposed or mis-split tensor cannot pass by symmetry. Every norm weight, bias, attention sink
and router correction is set to a random non-trivial value (transformers initialises many of them to
ones or zeros), so that a model ignoring one of them would not match.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

_BASE = dict(
    vocab_size=256,
    initializer_range=0.08,
    max_position_embeddings=1280,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    num_hidden_layers=3,
)
_DEEPSEEK = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=16,
    n_shared_experts=2,
    num_experts_per_tok=4,
)
_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
# As gpt-oss ships it (rope_theta 150k, no truncation of the correction range), scaled to a tiny context.
_GPT_OSS_YARN = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 8.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 256,
}

VARIANTS = {
    "v2": dict(_DEEPSEEK, model_type="deepseek_v2", q_lora_rank=None),
    "v2_qlora_yarn": dict(
        _DEEPSEEK, model_type="deepseek_v2", q_lora_rank=24, rope_parameters=_YARN
    ),
    "v2_group_limited": dict(
        _DEEPSEEK,
        model_type="deepseek_v2",
        q_lora_rank=None,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
    ),
    "v3": dict(
        _DEEPSEEK,
        model_type="deepseek_v3",
        q_lora_rank=24,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=0,
    ),
    # Layers 0..5: MoE at 1 and 5 (sparse step 2, layer 3 dense by mlp_only_layers); layers 1 and 4 slide.
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_hidden_layers=6,
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_attention_heads=6,
        num_key_value_heads=2,
        num_experts=10,
        num_experts_per_tok=3,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
        qkv_bias=True,
        use_sliding_window=True,
        sliding_window=8,
        layer_types=[
            "full_attention",
            "sliding_attention",
            "full_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
        ],
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        hidden_size=40,
        intermediate_size=64,
        moe_intermediate_size=20,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    ),
    "olmoe": dict(
        model_type="olmoe",
        hidden_size=48,
        intermediate_size=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=10,
        num_experts_per_tok=4,
        clip_qkv=0.8,
        attention_bias=True,
    ),
    "mixtral": dict(
        model_type="mixtral",
        hidden_size=40,
        intermediate_size=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=6,
        num_experts_per_tok=2,
        sliding_window=8,
    ),
    "glm4_moe": dict(
        model_type="glm4_moe",
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=12,
        n_routed_experts=10,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=5,
        topk_group=2,
        first_k_dense_replace=1,
        use_qk_norm=True,
        attention_bias=True,
        partial_rotary_factor=0.5,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
        num_nextn_predict_layers=0,
    ),
    # MXFP4 needs every expert input width (hidden, intermediate) a multiple of 32.
    "gpt_oss": dict(
        model_type="gpt_oss",
        hidden_size=64,
        intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=6,
        num_experts_per_tok=3,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=_GPT_OSS_YARN,
        max_position_embeddings=2048,
    ),
}
DEEPSEEK_VARIANTS = ("v2", "v2_qlora_yarn", "v2_group_limited", "v3")
FAMILY_VARIANTS = tuple(v for v in VARIANTS if v not in DEEPSEEK_VARIANTS)

_CLASSES = {
    "deepseek_v2": "DeepseekV2",
    "deepseek_v3": "DeepseekV3",
    "qwen2_moe": "Qwen2Moe",
    "qwen3_moe": "Qwen3Moe",
    "olmoe": "Olmoe",
    "mixtral": "Mixtral",
    "glm4_moe": "Glm4Moe",
    "gpt_oss": "GptOss",
}


def routers(model: transformers.PreTrainedModel) -> list[torch.nn.Module]:
    """The router of every MoE layer, in layer order (`mlp.gate`, gpt-oss's `mlp.router`;
    dense MLPs have neither)."""
    found = [
        getattr(layer.mlp, "router", None) or getattr(layer.mlp, "gate", None)
        for layer in model.model.layers
    ]
    return [r for r in found if r is not None]


@torch.no_grad()
def _randomise(model: transformers.PreTrainedModel) -> None:
    """Norms, biases, sinks, corrections and routers off their ones/zeros initialisation."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("norm.weight"):
            t.copy_(1.0 + 0.2 * torch.randn_like(t))
        elif name.endswith(("bias", "sinks")):
            t.normal_(0.0, 0.1 if name.endswith("bias") else 0.5)
    for router in routers(model):
        router.weight.normal_(0.0, 0.3)  # a router that actually discriminates


def build(variant: str, out_dir: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Build the variant with random weights, save it to out_dir, return the torch model (eval, fp32)."""
    torch.manual_seed(seed)
    kw = {**_BASE, **VARIANTS[variant]}
    prefix = _CLASSES[kw.pop("model_type")]
    cfg = getattr(transformers, f"{prefix}Config")(**kw)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # the per-expert loop: the plainest reference
    model = getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()
    _randomise(model)
    model.save_pretrained(out_dir)
    return model


def load(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    ).eval()


def run(model: transformers.PreTrainedModel, tokens, attention_mask):
    """(logits [B, T, V], per MoE layer (ids [B*T, k], weights [B*T, k])) as numpy."""
    captured = []  # every router returns (logits, top-k weights, top-k ids)
    hooks = [
        r.register_forward_hook(lambda m, i, out: captured.append((out[2], out[1])))
        for r in routers(model)
    ]
    try:
        with torch.no_grad():
            out = model(
                input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(attention_mask)
            )
    finally:
        for h in hooks:
            h.remove()
    return out.logits.float().numpy(), [(ids.numpy(), w.float().numpy()) for ids, w in captured]

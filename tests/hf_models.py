"""Tiny random MoE models of every supported family built with transformers (the reference), saved to disk.

Sizes are small and deliberately uneven (odd expert counts, head_dim decoupled from hidden / heads) so
that a transposed or mis-split tensor cannot pass by symmetry. Every norm weight, bias, attention sink
and router correction is set to a random non-trivial value (transformers initialises many of them to
ones or zeros), so that a model ignoring one of them would not match.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

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


# Small, not square: a tiny model's matrices span several blocks, partial ones among them.
FP8_BLOCK = (16, 32)


def _padded(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w [..., out, in] zero-padded to whole blocks (as float32: torch pads no FP8)."""
    rows, cols = w.shape[-2:]
    return torch.nn.functional.pad(w.float(), (0, -cols % block[1], 0, -rows % block[0]))


def fp8_quantize(
    w: torch.Tensor, block: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Fp8Quantize of w [..., out, in] -> (FP8 weight, float32 scales [..., ceil(out/bo),
    ceil(in/bi)]). It quantises only whole blocks, so w is zero-padded to them first (zeros change
    no block's max, hence no scale) and cut back after."""
    rows, cols = w.shape[-2:]
    config = transformers.FineGrainedFP8Config(weight_block_size=block)
    padded = _padded(w, block) if block else w.float()
    out = Fp8Quantize(SimpleNamespace(quantization_config=config)).convert({"w.weight": padded})
    return out["w.weight"][..., :rows, :cols].contiguous(), out["w.weight_scale_inv"]


def fp8_dequantize(
    w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype
) -> torch.Tensor:
    """transformers' Fp8Dequantize of (w, scale) into `dtype`. It takes the block size from the scale
    grid (out / rows of scales), right only for whole blocks: w is zero-padded to them first."""
    rows, cols = w.shape[-2:]
    padded = _padded(w, block).to(w.dtype) if block else w
    return Fp8Dequantize(None)._dequantize_one(padded, scale, dtype)[..., :rows, :cols].contiguous()


def fp8_checkpoint(
    src: Path, dst: Path, block: tuple[int, int] | None = FP8_BLOCK
) -> dict[str, torch.Tensor]:
    """`src` (a save_pretrained directory) as the Hub's FP8 checkpoints store it in `dst`: every
    matrix of the layers (attention, experts, shared and dense MLPs; not the router, embeddings or
    lm_head) FP8 with its `_scale_inv`, and config.json's fp8 quantization_config.
    -> transformers' bfloat16 dequantisation of each quantised tensor, by name."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    dequantised = {}
    quantised = [
        n
        for n, t in tensors.items()
        if n.startswith("model.layers.") and t.ndim == 2 and not n.endswith("mlp.gate.weight")
    ]
    for name in quantised:
        w, scale = fp8_quantize(tensors[name], block)
        tensors[name], tensors[name + "_scale_inv"] = w, scale
        dequantised[name] = fp8_dequantize(w, scale, block, torch.bfloat16)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(block) if block else None,
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(src / "generation_config.json", dst / "generation_config.json")
    return dequantised


def with_weights(src: Path, dst: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A copy of checkpoint `src` in `dst` with the tensors `weights` replaced (for a reference model
    run on dequantised weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {**load_file(src / "model.safetensors"), **weights}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


# gpt-oss's quantization_config on the Hub
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def mxfp4_checkpoint(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """gpt-oss checkpoint `src` as the Hub ships gpt-oss in `dst`: every layer's expert matrices
    (`mlp.experts.gate_up_proj`, `down_proj`) MXFP4 `_blocks` / `_scales` (our quantiser:
    esft_jax.checkpoint.mxfp4), config.json's mxfp4 quantization_config. -> transformers'
    dequantisation (convert_moe_packed_tensors, bfloat16) of each quantised tensor, by name."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from esft_jax.checkpoint import mxfp4

    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    dequantised = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = mxfp4.quantize(tensors.pop(name).float().numpy())
        tensors[name + "_blocks"] = torch.from_numpy(blocks)
        tensors[name + "_scales"] = torch.from_numpy(scales)
        dequantised[name] = convert_moe_packed_tensors(
            torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.bfloat16
        )
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = MXFP4_CONFIG
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(src / "generation_config.json", dst / "generation_config.json")
    return dequantised

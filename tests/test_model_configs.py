"""The published models' config files (configs/models/): their parameter counts against the model
cards, the same ModelConfig from each family's real config.json, and `esft plan` on each.

Counts come from the abstract parameter tree (nothing allocated). esft_jax has no active-parameter
helper, so `_count` is here: every parameter outside the routed experts (attention, dense layers,
routers, shared experts, norms) plus k of the E routed experts of each MoE layer; the embedding and
unembedding tables only where the card counts them.
"""

import dataclasses
import math
from pathlib import Path

import jax
import pytest

from esft_jax.app import config_blocks, config_files
from esft_jax.app.commands import plan as plan_command
from esft_jax.checkpoint.hf_names import config_from_hf
from esft_jax.model import ModelConfig, abstract_params

ROOT = Path(__file__).parent.parent
TABLES = ("embed", "lm_head")


def _load(name: str) -> ModelConfig:
    return config_files.model_config(config_blocks.model(name))


@dataclasses.dataclass(frozen=True)
class Card:
    """A model card's counts, and which [vocab, d] tables each of them includes."""

    total: float
    active: float
    total_tables: tuple[str, ...] = TABLES
    active_tables: tuple[str, ...] = TABLES


CARDS = {
    "qwen1_5_moe_a2_7b": Card(14.3e9, 2.7e9),  # "14.3B parameters in total and 2.7B activated"
    "qwen3_30b_a3b": Card(30.5e9, 3.3e9),  # "30.5B in total and 3.3B activated"
    "olmoe_1b_7b": Card(6.9e9, 1.3e9),  # OLMoE paper: 6.9B total, 1.3B active
    # "46.7B total parameters but only uses 12.9B parameters per token"
    "mixtral_8x7b": Card(46.7e9, 12.9e9),
    # "106 billion total ... 12 billion active", without embeddings
    "glm4_5_air": Card(106e9, 12e9, (), ()),
    # the unembedding is active, the lookup not
    "gpt_oss_20b": Card(20.91e9, 3.61e9, active_tables=("lm_head",)),
    # Moonlight paper, embeddings excluded (card: 16B / 3B)
    "moonlight_16b_a3b": Card(15.29e9, 2.24e9, (), ()),
}


def _count(cfg: ModelConfig, tables: tuple[str, ...], active: bool) -> int:
    """Parameters of the model (active: those one token uses), counting only `tables` of embed / lm_head."""
    params = abstract_params(cfg)
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    n = size(params) - sum(size(params[t]) for t in TABLES if t in params and t not in tables)
    if active:  # experts [L, E, ...]: every expert of a layer has the same size
        experts = size(params["moe_layers"]["moe"]["experts"])
        n -= experts - experts * cfg.num_experts_per_tok // cfg.n_routed_experts
    return n


@pytest.mark.parametrize("name", sorted(CARDS))
def test_parameter_counts_match_the_model_card(name):
    cfg, card = _load(name), CARDS[name]
    assert _count(cfg, card.total_tables, active=False) == pytest.approx(card.total, rel=0.02)
    assert _count(cfg, card.active_tables, active=True) == pytest.approx(card.active, rel=0.02)


# Each model's config.json on the Hub, the keys our mapping reads (and a few it must ignore), real values.
HUB = {
    "qwen1_5_moe_a2_7b": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "max_position_embeddings": 8192,
        "max_window_layers": 21,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "qwen3_30b_a3b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "attention_bias": False,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 40960,
        "max_window_layers": 48,
        "use_sliding_window": False,
        "sliding_window": None,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "olmoe_1b_7b": {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "vocab_size": 50304,
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "attention_bias": False,
        "clip_qkv": None,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "max_position_embeddings": 4096,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05,
        "eos_token_id": 50279,
        "pad_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    },
    "mixtral_8x7b": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        "sliding_window": None,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-05,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "glm4_5_air": {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "vocab_size": 151552,
        "hidden_size": 4096,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 46,
        "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 96,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "attention_bias": True,
        "use_qk_norm": False,
        "partial_rotary_factor": 0.5,
        "n_routed_experts": 128,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "max_position_embeddings": 131072,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "rms_norm_eps": 1e-05,
        "eos_token_id": [151329, 151336, 151338],
        "pad_token_id": 151329,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "gpt_oss_20b": {  # no torch_dtype: the experts are MXFP4 on the Hub, the rest bfloat16
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 24,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "attention_bias": True,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "swiglu_limit": 7.0,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
        "sliding_window": 128,
        "initial_context_length": 4096,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "rms_norm_eps": 1e-05,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "tie_word_embeddings": False,
        "quantization_config": {"quant_method": "mxfp4"},
    },
    "moonlight_16b_a3b": {  # Moonlight-16B-A3B-Instruct
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 163840,
        "hidden_size": 2048,
        "intermediate_size": 11264,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.446,
        "num_nextn_predict_layers": 0,
        "max_position_embeddings": 8192,
        "rope_theta": 50000.0,
        "rms_norm_eps": 1e-05,
        "bos_token_id": 163584,
        "eos_token_id": 163586,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
}
# How we hold the weights, whatever the checkpoint's dtype (OLMoE's is float32).
RUNTIME = dict(dtype="bfloat16", param_dtype="bfloat16")


@pytest.mark.parametrize("name", sorted(HUB))
def test_config_file_is_what_its_hub_config_json_maps_to(name):
    assert config_from_hf(HUB[name], **RUNTIME) == _load(name)


# Kimi-K2-Instruct's config.json: DeepSeek-V3's architecture with remote code, model_type "kimi_k2".
KIMI_K2_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "vocab_size": 163840,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.827,
    "num_nextn_predict_layers": 0,
    "max_position_embeddings": 131072,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rms_norm_eps": 1e-06,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
}


def _kimi_k2() -> ModelConfig:
    """Kimi K2 as DeepSeek-V3 (configs/models/deepseek_v3.py) with its own sizes, routing scale and rope."""
    return _load("deepseek_v3").replace(
        vocab_size=163840,
        num_attention_heads=64,
        first_k_dense_replace=1,
        n_routed_experts=384,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.827,
        rope_theta=50000.0,
        rope_factor=32.0,
        rope_beta_fast=1.0,
        max_position_embeddings=131072,
        bos_token_id=163584,
        eos_token_id=163585,
    )


def test_kimi_k2_config_json_loads_as_deepseek_v3():
    """What transformers' remote-code DeepseekV3Config makes of Kimi K2's config.json
    (model_type relabelled)."""
    assert (
        config_from_hf({**KIMI_K2_HUB, "model_type": "deepseek_v3"}, dtype="bfloat16") == _kimi_k2()
    )


def test_kimi_k2_config_json_loads_as_published():
    """model_type "kimi_k2" loads through deepseek_v3 (and exports as deepseek_v3, which
    transformers loads)."""
    assert config_from_hf(KIMI_K2_HUB, dtype="bfloat16") == _kimi_k2()


# esft plan compiles one ESFT step per model (~5-10 s each on 2 CPU cores, whatever the model's size):
# one model per kind of parts -- GQA with sinks, biases and router bias; GQA with the gated shared
# expert and interleaved layers; MLA with the V3 router -- keeps the suite's time; the others share them.
PLANNED = ["gpt_oss_20b", "qwen1_5_moe_a2_7b", "moonlight_16b_a3b"]


@pytest.mark.parametrize("name", PLANNED)
def test_esft_plan_compiles_a_step_of_the_model(name, capsys):
    c = config_files.load(
        f"{ROOT / 'configs/plan.py'}:{name}",
        ["devices=(1,)", "methods=esft", "batch_size=1", "seq_len=16"],
    )
    plan_command.run(c)
    row = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| esft | 1 |")
    )
    params = abstract_params(_load(name))
    held = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
    # the frozen model, in GiB
    assert float(row.split("|")[4]) == pytest.approx(held / 1024**3, abs=0.01)

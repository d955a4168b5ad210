"""Model config files, config.json conversion in both layouts, overrides, and the CLI."""

import json
import math
from pathlib import Path

import jax
import pytest

from esft_jax import cli, configs
from esft_jax.checkpoint.hf_names import config_from_hf, config_to_hf
from esft_jax.model import ConfigError, ModelConfig, abstract_params

CONFIGS = Path(__file__).parent.parent / "configs"

# DeepSeek-V2-Lite's config.json as the Hub holds it (remote-code era layout), abridged to what we read.
V2_LITE_HUB = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "first_k_dense_replace": 1,
    "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1, "topk_method": "greedy",
    "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "bos_token_id": 100000, "eos_token_id": 100001,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "aux_loss_alpha": 0.001, "seq_aux": True,
}


def _params(cfg):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def test_deepseek_v2_lite_config_matches_hub_config_and_published_size():
    from_file = configs.model_config(configs.load_file(str(CONFIGS / "models/deepseek_v2_lite.py")))
    from_hub = config_from_hf(V2_LITE_HUB, dtype="bfloat16")
    assert from_file == from_hub.replace(n_group=None, topk_group=None)
    assert round(_params(from_file) / 1e9, 1) == 15.7  # "15.7B total parameters"
    # transformers 5 layout of the same model reads back identically.
    assert config_from_hf(config_to_hf(from_hub), dtype="bfloat16") == from_hub


def test_deepseek_v3_config_has_the_published_size():
    cfg = configs.model_config(configs.load_file(str(CONFIGS / "models/deepseek_v3.py")))
    assert round(_params(cfg) / 1e9) == 671
    expert_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)["moe_layers"]["moe"]["experts"]))
    active = _params(cfg) - expert_params * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
    assert round((active - cfg.vocab_size * cfg.hidden_size) / 1e9) == 37  # "37B activated"


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "models").glob("*.py")))
def test_every_model_config_file_builds(name):
    cfg = configs.model_config(configs.load_file(str(CONFIGS / "models" / f"{name}.py")))
    assert cfg.num_moe_layers > 0


def test_invalid_model_configs_are_rejected():
    with pytest.raises(ConfigError, match="needs n_group and topk_group"):
        ModelConfig(topk_method="group_limited_greedy")
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({"hidden": 3})


def test_overrides(tmp_path):
    c = configs.load(f"{CONFIGS}/route.py:tiny", ["batch_size=3", "model.q_lora_rank=16", "text=42", "mesh.expert=4"])
    assert (c.batch_size, c.model.q_lora_rank, c.text, c.mesh.expert) == (3, 16, "42", 4)
    with pytest.raises(configs.ConfigFileError, match="route.py has no key 'model.nope'"):
        configs.load(f"{CONFIGS}/route.py", ["model.nope=1"])
    with pytest.raises(configs.ConfigFileError, match="no such config file"):
        configs.load(str(tmp_path / "missing.py"))


def test_cli_route_prints_a_table_per_moe_layer(capsys):
    assert cli.main(["route", "--config", f"{CONFIGS}/route.py:tiny", "--config.checkpoint=random", "--config.batch_size=2",
                     "--config.seq_len=16"]) == 0
    out = capsys.readouterr().out
    assert "32 routed experts, top-4" in out
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "layer" not in line] \
        == ["1", "2", "3"]


def test_cli_reports_errors_without_a_traceback(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert cli.main(["route", "--config", f"{CONFIGS}/route.py", f"--config.checkpoint={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "config.json: model_type 'llama'" in err and "Traceback" not in err


def test_mesh_that_does_not_split_the_model_is_one_line(capsys):
    """Checked against every parameter before anything is read: no IndivisibleError from deep in jax."""
    assert cli.main(["route", "--config", f"{CONFIGS}/route.py:tiny", "--config.checkpoint=random",
                     "--config.mesh.expert=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config.mesh.expert=3: does not divide moe_layers/moe/experts/" in err

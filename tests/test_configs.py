"""Model config files, config.json conversion in both layouts, overrides, and the CLI."""

import json
import math
import re
from pathlib import Path

import jax
import pytest

import esft_jax.builtin
from esft_jax.app import cli, config_blocks, config_files
from esft_jax.app.commands import run as study
from esft_jax.checkpoint.hf_names import config_from_hf, config_to_hf
from esft_jax.model import ConfigError, ModelConfig, abstract_params

CONFIGS = Path(__file__).parent.parent / "configs"

# DeepSeek-V2-Lite's config.json as the Hub holds it (remote-code era layout), abridged to what we read.
V2_LITE_HUB = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
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
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
}


def _params(cfg):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def test_deepseek_v2_lite_config_matches_hub_config_and_published_size():
    from_file = config_files.model_config(config_blocks.model("deepseek_v2_lite"))
    from_hub = config_from_hf(V2_LITE_HUB, dtype="bfloat16")
    assert from_file == from_hub.replace(n_group=None, topk_group=None)
    assert round(_params(from_file) / 1e9, 1) == 15.7  # "15.7B total parameters"
    # transformers 5 layout of the same model reads back identically.
    assert config_from_hf(config_to_hf(from_hub), dtype="bfloat16") == from_hub


def test_deepseek_v3_config_has_the_published_size():
    cfg = config_files.model_config(config_blocks.model("deepseek_v3"))
    assert round(_params(cfg) / 1e9) == 671
    expert_params = sum(
        math.prod(x.shape)
        for x in jax.tree.leaves(abstract_params(cfg)["moe_layers"]["moe"]["experts"])
    )
    active = _params(cfg) - expert_params * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
    assert round((active - cfg.vocab_size * cfg.hidden_size) / 1e9) == 37  # "37B activated"


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "models").glob("*.py")))
def test_every_model_config_file_builds(name):
    cfg = config_files.model_config(config_blocks.model(name))
    assert cfg.num_moe_layers > 0


def test_invalid_model_configs_are_rejected():
    with pytest.raises(ConfigError, match="needs n_group and topk_group"):
        ModelConfig(topk_method="group_limited_greedy")
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({"hidden": 3})


def test_overrides(tmp_path):
    c = config_files.load(
        f"{CONFIGS}/route.py:tiny",
        ["batch_size=3", "model.q_lora_rank=16", "text=42", "mesh.expert=4"],
    )
    assert (c.batch_size, c.model.q_lora_rank, c.text, c.mesh.expert) == (3, 16, "42", 4)
    with pytest.raises(config_files.ConfigFileError, match="route.py has no key 'model.nope'"):
        config_files.load(f"{CONFIGS}/route.py", ["model.nope=1"])
    with pytest.raises(config_files.ConfigFileError, match="no such config file"):
        config_files.load(str(tmp_path / "missing.py"))


def test_cli_route_prints_a_table_per_moe_layer(capsys):
    assert (
        cli.main(
            [
                "route",
                "--config",
                f"{CONFIGS}/route.py:tiny",
                "--config.checkpoint=random",
                "--config.batch_size=2",
                "--config.seq_len=16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "32 routed experts, top-4" in out
    assert [
        line.split("|")[1].strip()
        for line in out.splitlines()
        if line.startswith("| ") and "layer" not in line
    ] == ["1", "2", "3"]


def test_cli_reports_errors_without_a_traceback(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert (
        cli.main(["route", "--config", f"{CONFIGS}/route.py", f"--config.checkpoint={tmp_path}"])
        == 2
    )
    err = capsys.readouterr().err
    assert "config.json: model_type 'llama'" in err and "Traceback" not in err


def test_mesh_that_does_not_split_the_model_is_one_line(capsys):
    """Checked against every parameter before anything is read: no IndivisibleError from deep in jax."""
    assert (
        cli.main(
            [
                "route",
                "--config",
                f"{CONFIGS}/route.py:tiny",
                "--config.checkpoint=random",
                "--config.mesh.expert=3",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "--config.mesh.expert=3: does not divide moe_layers/moe/experts/" in err
    )


BUILTIN_MODEL = str(Path(esft_jax.builtin.__file__).parent / "tiny_moe")


@pytest.mark.parametrize("override", ["model.num_hidden_layers=2", "model.param_dtype=bfloat16"])
def test_architecture_override_with_a_checkpoint_is_one_line_exit_2(override, capsys):
    """With a checkpoint the architecture is its config.json's: overriding it is refused, not ignored."""
    assert (
        cli.main(
            [
                "route",
                "--config",
                "configs/route.py",
                f"--config.checkpoint={BUILTIN_MODEL}",
                f"--config.{override}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    key = override.split("=")[0]
    field = key.removeprefix("model.")
    expected = (
        f"esft route: error: --config.{key}: "
        f"{field} comes from the checkpoint's config.json ({BUILTIN_MODEL})"
    )
    assert err.count("\n") == 1 and err.startswith(expected), err


def test_architecture_override_applies_to_random_weights_and_runtime_fields_to_a_checkpoint(capsys):
    assert (
        cli.main(
            [
                "route",
                "--config",
                "configs/route.py",
                "--config.checkpoint=random",
                "--config.seq_len=8",
                "--config.batch_size=1",
                "--config.model.num_hidden_layers=2",
            ]
        )
        == 0
    )
    assert "2 layers (1 MoE)" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "route",
                "--config",
                "configs/route.py",
                f"--config.checkpoint={BUILTIN_MODEL}",
                "--config.batch_size=1",
                "--config.seq_len=8",
                "--config.model.moe_strategy=dense",
            ]
        )
        == 0
    )


def test_a_study_training_an_architecture_override_is_refused_before_it_starts(tmp_path):
    c = config_files.load(
        "configs/experiments/builtin.py",
        [f"run_dir={tmp_path}", "train=('model.remat=True', 'model.num_hidden_layers=2')"],
    )
    refused = r"--config.train: 'model.num_hidden_layers=2': num_hidden_layers comes from the checkpoint's"
    with pytest.raises(config_files.ConfigFileError, match=refused):
        study.check(c)
    study.check(
        config_files.load(
            "configs/experiments/builtin.py", [f"run_dir={tmp_path}", "train=('model.remat=True',)"]
        ),
    )


def test_every_config_file_shares_the_common_blocks():
    """The mesh and distributed blocks and the model source: config_blocks' defaults everywhere."""
    for spec in ("route.py", "profile.py", "eval.py", "train.py", "experiments/builtin.py"):
        c = config_files.load_file(f"configs/{spec}")
        assert c.mesh.to_dict() == config_blocks.mesh().to_dict(), spec
        assert (c.tokenizer, c.model.to_dict()) == ("", config_blocks.model("tiny").to_dict()), spec
        if "distributed" in c:
            assert c.distributed.to_dict() == config_blocks.distributed().to_dict(), spec
    assert config_files.load_file(
        "configs/plan.py:tiny"
    ).model.remat  # a preset's model, plus what plan changes


def test_official_study_of_law_loads():
    """law has training data in the official datasets but is no built-in task (it used to fail to load)."""
    c = config_files.load_file("configs/experiments/official.py:law")
    assert (c.task, c.run_dir) == ("law", "runs/official_law")
    assert c.general_tasks == ("intent", "summary", "translation")


def test_a_config_file_of_another_command_is_named_as_such(tmp_path):
    """Every shipped config file is accepted by its own command and, given to any other, refused
    naming the command it is for (before its overrides, which are the other command's keys); a file
    with the keys of no command names those its command lacks."""
    shipped = {
        f"configs/{file}": command
        for command, files in config_files.COMMAND_FILES.items()
        for file in files
    } | {"configs/experiments/builtin.py": "run", "configs/experiments/ablations.py": "run"}
    for path, home in shipped.items():
        assert config_files.load(path, command=home) == config_files.load_file(path)
        for command in set(config_files.COMMAND_FILES) - {home}:
            message = f"{path} is a config for `esft {home}`, not `esft {command}`"
            with pytest.raises(config_files.ConfigFileError, match=re.escape(message)):
                config_files.load(path, ["workdir=elsewhere"], command=command)
    own = tmp_path / "mine.py"
    own.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict(dict(n_train=1, n_eval=1, seed=0))\n"
    )
    with pytest.raises(
        config_files.ConfigFileError,
        match=re.escape(f"{own}: not a config for `esft data`: it lacks n_docs, out, overwrite "),
    ):
        config_files.load(str(own), command="data")

"""Bad checkpoint directories fail with errors that name the file, the key or the tensor."""

import json
import re
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from esft_jax.checkpoint import CheckpointError, load_checkpoint, load_tokenizer, save_checkpoint
from esft_jax.model import ModelConfig, init_params


@pytest.fixture()
def ckpt(tmp_path):
    cfg = ModelConfig()
    return save_checkpoint(tmp_path / "ckpt", cfg, init_params(cfg, jax.random.key(0)))


def test_missing_directory_or_files(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match=r"nowhere/config.json: no such file"):
        load_checkpoint(tmp_path / "nowhere")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"
    ):
        load_checkpoint(ckpt)


def test_unknown_model_type_and_bad_json(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'llama' .* not supported"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text('{\n  "model_type": "deepseek_v2",\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config.json:3: not valid JSON"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "deepseek_v2", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match=r"lacks required keys \['vocab_size'"):
        load_checkpoint(ckpt)


def test_missing_tensor_named_with_expected_shape(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.7.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"missing tensors .*model\.layers\.2\.mlp\.experts\.7\.up_proj\.weight \[32, 64\]",
    ):
        load_checkpoint(ckpt)


def test_misshaped_tensor_named_with_both_shapes(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.kv_b_proj.weight"] = np.zeros((3, 16), np.float32)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"kv_b_proj.weight has shape \[3, 16\], expected \[64, 16\]"
    ):
        load_checkpoint(ckpt)


def test_sharded_index_pointing_at_a_missing_shard(tmp_path):
    cfg = ModelConfig()
    out = save_checkpoint(
        tmp_path / "sharded", cfg, init_params(cfg, jax.random.key(0)), max_shard_bytes=100_000
    )
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(
        CheckpointError, match=f"{shards[-1].name}: listed in .*index.json but missing"
    ):
        load_checkpoint(out)


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, ckpt, monkeypatch):
    cfg = ModelConfig()
    before = (ckpt / "model.safetensors").read_bytes()
    import esft_jax.checkpoint.hf_export as hf_export

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(ckpt, cfg, init_params(cfg, jax.random.key(1)), overwrite=True)
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt"
    ]  # no staging directory left behind


def test_tokenizer(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="tokenizer.json: no such file"):
        load_tokenizer(ckpt)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "tok").encode("hello world again").ids == [1, 2, 0]
    # save_checkpoint carries the tokenizer along.
    cfg = ModelConfig()
    out = save_checkpoint(
        tmp_path / "with_tok",
        cfg,
        init_params(cfg, jax.random.key(0)),
        tokenizer_from=tmp_path / "tok",
    )
    assert load_tokenizer(out).encode("world").ids == [2]
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tok")
    shutil.rmtree(out)


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # the JSON header garbled
        path.write_bytes(data[:8] + b"#" * 16 + data[24:])


@pytest.mark.parametrize("how", ["truncated", "garbled"])
def test_unreadable_safetensors_named_in_one_line(tmp_path, ckpt, capsys, how):
    from esft_jax.app import cli
    from esft_jax.checkpoint.adapter import ADAPTER_FILE, read_adapter, write_adapter

    adapter = write_adapter(
        tmp_path / "adapter",
        {"model.layers.1.mlp.experts.0.up_proj.weight": np.ones((32, 64))},
        {"method": "esft", "model_type": "deepseek_v2"},
    )
    sharded = save_checkpoint(
        tmp_path / "sharded",
        ModelConfig(),
        init_params(ModelConfig(), jax.random.key(0)),
        max_shard_bytes=100_000,
    )
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    for path, read in [
        (ckpt / "model.safetensors", lambda: load_checkpoint(ckpt)),
        (shard, lambda: load_checkpoint(sharded)),
        (adapter / ADAPTER_FILE, lambda: read_adapter(adapter)),
    ]:
        _damage(path, how)
        with pytest.raises(
            CheckpointError,
            match=rf"^{re.escape(str(path))}: not a readable safetensors file \(.+\)$",
        ):
            read()
    code = cli.main(
        [
            "export",
            "--config",
            "configs/export.py",
            f"--config.checkpoint={sharded}",
            f"--config.adapter={adapter}",
            f"--config.out={tmp_path / 'out'}",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2 and err.count("\n") == 1 and f"{shard}: not a readable safetensors file" in err
    ), err
    assert not (tmp_path / "out").exists()


def test_malformed_adapter_config_named(tmp_path):
    from esft_jax.checkpoint.adapter import CONFIG_FILE, read_adapter, write_adapter

    adapter = write_adapter(
        tmp_path / "adapter", {"x.weight": np.ones(2)}, {"method": "lora", "r": 8}
    )
    config = adapter / CONFIG_FILE
    for text, message in [
        ('{"method": "lora",\n oops}', rf"{CONFIG_FILE}:2: not valid JSON"),
        ("[8]", rf"{CONFIG_FILE}: expected a JSON object"),
        ('{"r": "8"}', rf"{CONFIG_FILE}: 'r' must be a positive number, got '8'"),
        ('{"r": 8, "lora_alpha": 0}', rf"{CONFIG_FILE}: 'lora_alpha' must be a positive number"),
    ]:
        config.write_text(text)
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(adapter))}/{message}"):
            read_adapter(adapter)
    config.unlink()
    with pytest.raises(
        CheckpointError, match=rf"{CONFIG_FILE}: no such file \(is .* an adapter directory\?\)"
    ):
        read_adapter(adapter)


def test_adapter_writer_replaces_only_an_adapter(tmp_path):
    from esft_jax.checkpoint.adapter import read_adapter, write_adapter
    from esft_jax.checkpoint.output_dir import OutputDirError

    out = write_adapter(tmp_path / "adapter", {"x.weight": np.ones(2)}, {"method": "esft"})
    write_adapter(out, {"x.weight": np.zeros(2)}, {"method": "esft"})  # a newer adapter replaces it
    np.testing.assert_array_equal(read_adapter(out)[0]["x.weight"], np.zeros(2))
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(
        OutputDirError, match=r"adapter: holds files this writer did not write \(notes.txt\)"
    ):
        write_adapter(out, {"x.weight": np.ones(2)}, {"method": "esft"})
    assert (out / "notes.txt").read_text() == "the user's"
    np.testing.assert_array_equal(read_adapter(out)[0]["x.weight"], np.zeros(2))

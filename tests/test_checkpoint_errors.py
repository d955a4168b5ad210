"""Bad checkpoint directories fail with errors that name the file, the key or the tensor."""

import json
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
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
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
    with pytest.raises(CheckpointError, match=r"missing tensors .*model\.layers\.2\.mlp\.experts\.7\.up_proj\.weight \[32, 64\]"):
        load_checkpoint(ckpt)


def test_misshaped_tensor_named_with_both_shapes(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.kv_b_proj.weight"] = np.zeros((3, 16), np.float32)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"kv_b_proj.weight has shape \[3, 16\], expected \[64, 16\]"):
        load_checkpoint(ckpt)


def test_sharded_index_pointing_at_a_missing_shard(tmp_path):
    cfg = ModelConfig()
    out = save_checkpoint(tmp_path / "sharded", cfg, init_params(cfg, jax.random.key(0)), max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name}: listed in .*index.json but missing"):
        load_checkpoint(out)


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, ckpt, monkeypatch):
    cfg = ModelConfig()
    before = (ckpt / "model.safetensors").read_bytes()
    import esft_jax.checkpoint.hf as hf

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(ckpt, cfg, init_params(cfg, jax.random.key(1)))
    assert (ckpt / "model.safetensors").read_bytes() == before


def test_tokenizer(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="tokenizer.json: no such file"):
        load_tokenizer(ckpt)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("hello world again").ids == [1, 2, 0]
    # save_checkpoint carries the tokenizer along.
    cfg = ModelConfig()
    out = save_checkpoint(tmp_path / "with_tok", cfg, init_params(cfg, jax.random.key(0)), tokenizer_from=tmp_path)
    assert load_tokenizer(out).encode("world").ids == [2]
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    shutil.rmtree(out)

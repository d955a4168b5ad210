"""An adapter knows its base: the fingerprint tells checkpoints apart by their weights, not by how
they are split into files, and eval and serve refuse an adapter trained on another base (export:
tests/test_train_loop.py, on a trained adapter)."""

import json

import numpy as np
import pytest
import train_fixtures as fx

from esft_jax.app import cli
from esft_jax.checkpoint import save_checkpoint
from esft_jax.checkpoint.adapter import write_adapter
from esft_jax.checkpoint.fingerprint import base_metadata, checkpoint_fingerprint


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two tiny bases of one architecture with other weights, and the first re-saved in shards."""
    root = tmp_path_factory.mktemp("fingerprint")
    a, b = fx.base_checkpoint(root / "a", seed=0), fx.base_checkpoint(root / "b", seed=1)
    sharded = save_checkpoint(
        root / "a_sharded", fx.tiny_config(), fx.tiny_params(0), max_shard_bytes=200_000
    )
    return root, a, b, sharded


def test_fingerprint_follows_the_weights_not_the_files(bases):
    root, a, b, sharded = bases
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(sharded)
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(b)
    # one expert's row changed (what a merged ESFT export is) is another base
    params = fx.tiny_params(0)
    params["moe_layers"]["moe"]["experts"]["down"] = np.asarray(
        params["moe_layers"]["moe"]["experts"]["down"]
    ).copy()
    params["moe_layers"]["moe"]["experts"]["down"][1, 5] += 1e-3
    one_expert = save_checkpoint(root / "one_expert", fx.tiny_config(), params)
    assert checkpoint_fingerprint(one_expert) != checkpoint_fingerprint(a)


def _adapter_of(root, base, name):
    """An (empty) adapter recorded as trained on `base`."""
    fingerprint = checkpoint_fingerprint(base)
    meta = {"method": "esft", "model_type": "deepseek_v2", **base_metadata(str(base), fingerprint)}
    return write_adapter(root / name, {}, meta)


def test_eval_and_serve_refuse_an_adapter_of_another_base(bases, tmp_path, capsys):
    root, a, b, _ = bases
    adapter = _adapter_of(tmp_path, a, "adapter")
    task = fx.task_dataset(tmp_path / "task.jsonl", n=8)
    eval_argv = [
        "eval",
        "--config",
        "configs/eval.py",
        f"--config.checkpoint={b}",
        f"--config.adapter={adapter}",
        f"--config.perplexity.data={task}",
        "--config.perplexity.seq_len=64",
        f"--config.out_dir={tmp_path / 'eval'}",
    ]
    capsys.readouterr()
    assert cli.main(eval_argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "allow_other_base" in err
    assert checkpoint_fingerprint(a) in err and checkpoint_fingerprint(b) in err
    assert not (tmp_path / "eval").exists()
    assert cli.main([*eval_argv, "--config.allow_other_base=True"]) == 0
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert np.isfinite(scores["perplexity"])
    serve_argv = [
        "serve",
        "--config",
        f"configs/serve.py:intent={adapter}",
        f"--config.checkpoint={b}",
    ]
    assert cli.main(serve_argv) == 2
    assert "allow_other_base" in capsys.readouterr().err

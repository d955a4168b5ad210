"""The ESFT commands on a family other than DeepSeek: profile -> select -> train -> export, on a tiny
Qwen2-MoE checkpoint whose MoE layers are not a suffix of the stack (decoder_sparse_step=2 and an
mlp_only layer: only layer 1 of 4 is MoE) and whose shared expert sits behind a gate."""

import json

import family_configs as fc
import jax
import numpy as np
import train_fixtures as fx

from esft_jax.app import cli
from esft_jax.checkpoint import load_checkpoint, save_checkpoint
from esft_jax.checkpoint.hf_names import config_from_hf
from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.expert_config import ExpertConfig

BYTE_SPECIALS = dict(vocab_size=260, bos_token_id=256, eos_token_id=257, pad_token_id=258)


def _checkpoint(path):
    cfg = config_from_hf({**fc.HF["qwen2_moe"], **BYTE_SPECIALS})
    tokenizer_dir = path.with_name("tokenizer")
    tokenizer_dir.mkdir()
    byte_tokenizer().save(str(tokenizer_dir / "tokenizer.json"))
    return save_checkpoint(path, cfg, fc.params(cfg), tokenizer_from=tokenizer_dir), cfg


def test_profile_select_train_export(tmp_path):
    base, cfg = _checkpoint(tmp_path / "base")
    data = fx.task_dataset(tmp_path / "task.jsonl", n=32)
    assert cfg.moe_layer_ids == (1,)
    assert (
        cli.main(
            [
                "profile",
                "--config",
                "configs/profile.py",
                f"--config.checkpoint={base}",
                f"--config.data={data}",
                f"--config.out_dir={tmp_path / 'stats'}",
                "--config.seq_len=64",
                "--config.token_budget=600",
                "--config.progress=False",
            ]
        )
        == 0
    )
    assert list(json.loads((tmp_path / "stats/summary.json").read_text())["token_scores"]) == ["1"]
    experts = tmp_path / "experts.json"
    assert (
        cli.main(
            [
                "select",
                "--config",
                "configs/select.py:token",
                f"--config.stats={tmp_path / 'stats'}",
                f"--config.out={experts}",
                "--config.p=0.5",
            ]
        )
        == 0
    )
    selected = ExpertConfig.load(experts, cfg.moe_layer_ids, cfg.n_routed_experts).experts[1]
    assert 0 < len(selected) < cfg.n_routed_experts

    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--config",
                "configs/train.py:esft",
                f"--config.checkpoint={base}",
                f"--config.data.train={data}",
                f"--config.expert_config={experts}",
                f"--config.workdir={run}",
                "--config.data.seq_len=64",
                "--config.batch_size=4",
                "--config.steps=3",
                "--config.log_every=1",
                "--config.eval_every=3",
                "--config.checkpoint_every=3",
                "--config.optim.lr=1e-2",
                "--config.optim.warmup_steps=0",
                "--config.data.validation_fraction=0.1",
                "--config.profile_tokens=300",
            ]
        )
        == 0
    )
    # the routing profile esft serve's monitor reads: the trained adapter's, on 300 prompt tokens
    # (tests/test_serve_monitor.py checks the measure), not the selection's on all tokens
    written = json.loads((run / "adapter" / "adapter_config.json").read_text())
    profile = written["routing_profile"]
    assert profile["tokens"] == 300 and profile["layers"] == list(cfg.moe_layer_ids)
    assert ExpertConfig.load(experts).profile["tokens"] > 300
    out = tmp_path / "export"
    assert (
        cli.main(
            [
                "export",
                "--config",
                "configs/export.py",
                f"--config.checkpoint={base}",
                f"--config.adapter={run / 'adapter'}",
                f"--config.out={out}",
            ]
        )
        == 0
    )

    _, before = load_checkpoint(base)
    _, after = load_checkpoint(out)
    for name in ("gate", "up", "down"):
        a = np.asarray(before["moe_layers"]["moe"]["experts"][name])[0]
        b = np.asarray(after["moe_layers"]["moe"]["experts"][name])[0]
        others = np.setdiff1d(np.arange(cfg.n_routed_experts), selected)
        np.testing.assert_array_equal(a[others], b[others])
        assert all(not np.array_equal(a[e], b[e]) for e in selected)
    flat_before, flat_after = (
        dict(jax.tree_util.tree_flatten_with_path(p)[0]) for p in (before, after)
    )
    for (
        path,
        value,
    ) in flat_before.items():  # attention, router, shared expert and its gate, norms, embeddings
        if "experts" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(
                value, flat_after[path], err_msg=jax.tree_util.keystr(path)
            )

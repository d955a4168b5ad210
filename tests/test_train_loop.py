"""The train loop end to end: exact resume, 8 devices == 1, adapters, export loaded by transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx
from numerics import assert_adam_close, assert_float32_close, model_roundings

from esft_jax import sharding
from esft_jax.app import cli, runtime
from esft_jax.app.commands import train as loop
from esft_jax.checkpoint import load_checkpoint
from esft_jax.checkpoint.adapter import load_with_adapter, read_adapter
from esft_jax.checkpoint.fingerprint import checkpoint_fingerprint
from esft_jax.data.pipeline import train_batches
from esft_jax.data.shards import LocalBatches
from esft_jax.data.sources import read_samples
from esft_jax.model import forward, param_axes
from esft_jax.train import step
from esft_jax.train.method import build_method


def _adapter(workdir):
    return read_adapter(workdir / "adapter")[0]


def _metrics(workdir):
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


# One ESFT run on one device that three tests share: the uninterrupted run a killed run must match,
# the one-device side of 8 devices == 1, and the adapter that is exported. Two data shards, each with
# its own stream position in the checkpoint; checkpoints at steps 2 and 4.
SHARED = {"steps": 4, "data.shards": 2, "optim.lr": 1e-3}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """(config, workdir, summary) of the shared uninterrupted run."""
    root = tmp_path_factory.mktemp("train_loop")
    c = fx.train_config(root, workdir=str(root / "uninterrupted"), **SHARED)
    return c, root / "uninterrupted", loop.train(c, progress=False)


@pytest.mark.slow
def test_killed_run_resumes_exactly(shared_run, tmp_path, monkeypatch):
    c_full, uninterrupted, full = shared_run
    # the same base checkpoint and data (train_config reuses those it finds in its folder)
    c = fx.train_config(uninterrupted.parent, workdir=str(tmp_path / "run_esft"), **SHARED)

    calls = {"n": 0}
    real_take = LocalBatches.take

    def crashing_take(
        self, n
    ):  # the process dies while fetching the batch of step 4 (checkpoint at 2)
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real_take(self, n)

    monkeypatch.setattr(LocalBatches, "take", crashing_take)
    with pytest.raises(KeyboardInterrupt):
        loop.train(c, progress=False)
    monkeypatch.setattr(LocalBatches, "take", real_take)
    # step 3 was lost
    assert max(int(p.name) for p in (tmp_path / "run_esft/checkpoints").iterdir()) == 2
    resumed = loop.train(c, progress=False)  # the same command again

    a, b = _adapter(uninterrupted), _adapter(tmp_path / "run_esft")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])

    def strip(metrics: list[dict]) -> list[dict]:
        return [
            {k: v for k, v in m.items() if k not in ("seconds", "tokens_per_s")} for m in metrics
        ]

    assert strip(_metrics(uninterrupted)) == strip(_metrics(tmp_path / "run_esft"))
    assert resumed["final_loss"] == full["final_loss"]


@pytest.mark.slow
def test_eight_devices_equal_one(shared_run, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    one, one_dir, _ = shared_run
    eight = fx.train_config(one_dir.parent, workdir=str(tmp_path / "eight"), **SHARED)
    eight.mesh.data, eight.mesh.expert = 2, 4

    # The gradients agree to float32 rounding ...
    cfg, frozen = runtime.load_model(one)
    method = build_method(one.method, loop.method_settings(one), cfg)
    samples, _ = read_samples(one.data.train)
    batch = jax.tree.map(
        jnp.asarray,
        next(
            iter(
                train_batches(
                    samples, runtime.tokenizer(one), cfg, seq_len=64, batch_size=4, seed=0
                )
            )
        ),
    )
    loss = step._loss_fn(method, cfg)
    grad = jax.jit(jax.grad(lambda t, f, b: loss(t, f, b)[0]))
    frozen = jax.tree.map(jnp.asarray, frozen)
    g1 = grad(method.init(frozen), frozen, batch)
    mesh = runtime.mesh(eight)
    sharded = sharding.shard_params(frozen, param_axes(cfg), mesh)
    with jax.set_mesh(mesh):
        g8 = grad(method.init(frozen), sharded, batch)
    n_roundings = 2 * model_roundings(cfg)  # forward and backward
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        assert_float32_close(b, a, n_roundings)

    # ... and so do 4 steps of the whole loop, up to Adam's amplification of rounding-level
    # gradients (tests/numerics.py).
    loop.train(eight, progress=False)
    a, b = _adapter(one_dir), _adapter(tmp_path / "eight")
    for name in a:
        assert_adam_close(b[name], a[name], n_roundings, lr=one.optim.lr, steps=one.steps)
    la, lb = _metrics(one_dir), _metrics(tmp_path / "eight")
    assert_float32_close([m["loss"] for m in lb], [m["loss"] for m in la], n_roundings)


def test_esft_adapter_holds_exactly_the_selected_experts_and_exports(shared_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    c, workdir, summary = shared_run
    tensors, meta = read_adapter(workdir / "adapter")
    expected = {
        f"model.layers.{layer}.mlp.experts.{e}.{k}_proj.weight"
        for layer, ids in fx.EXPERTS.experts.items()
        for e in ids
        for k in ("gate", "up", "down")
    }
    assert set(tensors) == expected and meta["method"] == "esft"
    assert meta["expert_config"] == fx.EXPERTS.to_json()
    assert meta["base_model_fingerprint"] == checkpoint_fingerprint(c.checkpoint)
    assert summary["adapter_bytes"] >= sum(t.nbytes for t in tensors.values())
    assert summary["trainable_params"] == fx.EXPERTS.num_selected() * 3 * 64 * 32

    out = tmp_path / "exported"
    assert (
        cli.main(
            [
                "export",
                "--config",
                "configs/export.py",
                f"--config.checkpoint={c.checkpoint}",
                f"--config.adapter={workdir / 'adapter'}",
                f"--config.out={out}",
            ]
        )
        == 0
    )
    cfg, merged = load_with_adapter(c.checkpoint, workdir / "adapter")
    _, base = load_checkpoint(c.checkpoint)
    _, exported = load_checkpoint(out)
    jax.tree.map(np.testing.assert_array_equal, exported, merged)
    changed = np.any(
        np.asarray(merged["moe_layers"]["moe"]["experts"]["gate"])
        != np.asarray(base["moe_layers"]["moe"]["experts"]["gate"]),
        axis=(2, 3),
    )
    assert changed.sum() == fx.EXPERTS.num_selected()

    tokens = np.random.default_rng(0).integers(0, 256, (2, 24))
    ours, _ = jax.jit(forward, static_argnums=2)(
        jax.tree.map(jax.numpy.asarray, merged), tokens, cfg
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (out / "tokenizer.json").is_file()

    # The merged export is another base (same architecture, other weights): the adapter is refused
    # on it, unless asked for.
    again = [
        "export",
        "--config",
        "configs/export.py",
        f"--config.checkpoint={out}",
        f"--config.adapter={workdir / 'adapter'}",
        f"--config.out={tmp_path / 'twice'}",
    ]
    assert cli.main(again) == 2
    assert cli.main([*again, "--config.allow_other_base=True"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "fft"])
def test_baselines_train_and_export(tmp_path, method):
    # no validation split to evaluate (what is checked here is what trains and what is exported)
    c = fx.train_config(tmp_path, method=method, steps=3, **{"data.validation_fraction": 0.0})
    summary = loop.train(c, progress=False)
    assert summary["final_loss"] is not None
    cfg, merged = load_with_adapter(c.checkpoint, tmp_path / f"run_{method}/adapter")
    _, base = load_checkpoint(c.checkpoint)
    assert not np.array_equal(
        merged["moe_layers"]["attn"]["kv_b"], base["moe_layers"]["attn"]["kv_b"]
    )
    if method == "lora":  # the merged adapter reproduces the trained model's weights
        tensors, meta = read_adapter(tmp_path / "run_lora/adapter")
        assert all(".lora_" in name for name in tensors) and meta["r"] == 8
        np.testing.assert_array_equal(merged["embed"], base["embed"])


def test_data_limit_trains_on_the_first_samples_after_the_validation_split(tmp_path):
    """The data-size ablation's knob: data.limit=N keeps the first N training samples (the same
    samples for every method, nested across sizes); validation is unchanged."""
    c = fx.train_config(tmp_path)
    cfg = runtime.model_config(c)
    tokenizer = runtime.tokenizer(c)
    template = runtime.chat_template(c, "data.template", tokenizer, cfg)
    whole = loop._read_data(c, tokenizer, cfg, template)
    c.data.limit = 10
    limited = loop._read_data(c, tokenizer, cfg, template)
    assert len(whole.train) > 10 and len(limited.train) == 10
    assert [limited.train[i] for i in range(10)] == [whole.train[i] for i in range(10)]
    assert [s for s in limited.validation] == [s for s in whole.validation]

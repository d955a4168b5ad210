"""Router-only tuning: only the routers train, their gradient is the full model's, and the adapter of
whole router tensors loads back to the trained params."""

import family_configs as fam
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx
from flax import traverse_util
from numerics import assert_float32_close, model_roundings

from esft_jax.app import config_files
from esft_jax.app.commands import train as loop
from esft_jax.app.commands.train import method_settings
from esft_jax.checkpoint import load_checkpoint
from esft_jax.checkpoint.adapter import load_with_adapter, read_adapter
from esft_jax.model import forward
from esft_jax.model.loss import next_token_loss
from esft_jax.train import step
from esft_jax.train.method import build_method, save_adapter
from esft_jax.train.router_only import RouterOnly

CFG = fx.tiny_config()
ROUTER = ("moe_layers", "moe", "router")


@pytest.fixture(scope="module")
def params():
    return fx.tiny_params()


def test_the_factory_builds_router_from_the_train_config():
    c = config_files.load_file("configs/train.py")
    c.method = "router"
    method = build_method(c.method, method_settings(c), CFG)
    assert isinstance(method, RouterOnly) and method.expert_config is None


def test_only_the_routers_change(params):
    method = RouterOnly()
    state, metrics = fx.run_steps(method, CFG, params, 3)
    assert np.isfinite(float(metrics["loss"]))
    assert list(state["trainable"]) == ["router"]  # the tiny model has no router bias
    before = traverse_util.flatten_dict(params)
    after = traverse_util.flatten_dict(method.write_back(params, state["trainable"]))
    assert before.keys() == after.keys()
    for path in before:
        assert after[path].dtype == before[path].dtype
        if path == ROUTER:
            # every layer
            assert np.all(np.any(np.asarray(after[path]) != np.asarray(before[path]), axis=(1, 2)))
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg="/".join(path))


def test_router_gradient_is_the_full_models(params):
    """The trained gradient == jax.grad of the plain full-param loss, restricted to the router."""
    batch = jax.tree.map(lambda x: jnp.asarray(x[0]), fx.token_batch(5))
    method = RouterOnly()
    loss = step._loss_fn(method, CFG)
    got = jax.jit(jax.grad(lambda t: loss(t, params, batch)[0]))(method.init(params))

    def full_loss(p):
        logits, _ = forward(
            p,
            batch["tokens"],
            CFG,
            segment_ids_bt=batch["segment_ids"],
            positions_bt=batch["positions"],
        )
        return next_token_loss(logits, batch)[0]

    want = jax.jit(jax.grad(full_loss))(params)["moe_layers"]["moe"]["router"]
    assert np.abs(np.asarray(want)).max() > 0
    assert_float32_close(got["router"], want, 2 * model_roundings(CFG))


@pytest.mark.parametrize(
    "family, trained", [("gpt_oss", {"router", "router_bias"}), ("deepseek_v3", {"router"})]
)
def test_router_bias_trains_and_the_choice_correction_never_does(family, trained):
    cfg = fam.config(family)
    params = fam.params(cfg)
    method = RouterOnly()
    trainable = method.init(params)
    assert set(trainable) == trained
    moe = params["moe_layers"]["moe"]
    shifted = jax.tree.map(lambda x: x + 1.0, trainable)
    tensors, meta = method.adapter_tensors(cfg, params, shifted)
    assert meta == {"method": "router"}
    assert len(tensors) == len(trained) * cfg.num_moe_layers
    for name, value in tensors.items():
        key = "router_bias" if name.endswith(".bias") else "router"
        layer = cfg.moe_layer_ids.index(int(name.split(".")[2]))
        want = np.asarray(moe[key][layer]) + 1.0
        np.testing.assert_array_equal(value, want.T if key == "router" else want)  # HF: [E, d]


def test_adapter_holds_exactly_the_routers_and_loads_back(tmp_path):
    base = fx.base_checkpoint(tmp_path / "base")
    cfg, frozen = load_checkpoint(base)
    frozen = jax.tree.map(jnp.asarray, frozen)
    method = RouterOnly()
    state, _ = fx.run_steps(method, cfg, frozen, 2)
    save_adapter(tmp_path / "adapter", cfg, method, frozen, state["trainable"])
    tensors, meta = read_adapter(tmp_path / "adapter")
    assert set(tensors) == {f"model.layers.{layer}.mlp.gate.weight" for layer in cfg.moe_layer_ids}
    assert meta == {"method": "router", "model_type": cfg.model_type}

    _, merged = load_with_adapter(base, tmp_path / "adapter")
    want = method.write_back(frozen, state["trainable"])
    jax.tree.map(np.testing.assert_array_equal, merged, jax.tree.map(np.asarray, want))
    assert not np.array_equal(
        merged["moe_layers"]["moe"]["router"], frozen["moe_layers"]["moe"]["router"]
    )


def test_esft_train_with_router_changes_only_the_routers(tmp_path):
    c = fx.train_config(tmp_path, method="fft", steps=2)
    c.method = "router"
    summary = loop.train(c, progress=False)
    assert (
        summary["trainable_params"] == CFG.num_moe_layers * CFG.hidden_size * CFG.n_routed_experts
    )
    _, merged = load_with_adapter(c.checkpoint, tmp_path / "run_fft/adapter")
    _, base = load_checkpoint(c.checkpoint)
    merged, base = traverse_util.flatten_dict(merged), traverse_util.flatten_dict(base)
    assert [path for path in base if not np.array_equal(merged[path], base[path])] == [ROUTER]

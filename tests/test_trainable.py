"""The trainable sets: what changes, what must not, optimizer-state size, and the compact ESFT path
against a full-size masked-gradient reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_fixtures as fx
from numerics import assert_adam_close, assert_float32_close, model_roundings

from esft_jax.app.commands.train import tree_bytes
from esft_jax.expert_config import ExpertConfig
from esft_jax.model import forward
from esft_jax.train.esft import ExpertSubset
from esft_jax.train.fft import FullFineTune
from esft_jax.train.lora import LoRA
from esft_jax.train.step import make_train_step
from esft_jax.train.trainable import non_expert_part

CFG = fx.tiny_config()


@pytest.fixture(scope="module")
def params():
    return fx.tiny_params()


def _leaves(tree):
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize("shared, non_expert", [(False, False), (True, False), (False, True)])
def test_esft_changes_only_what_it_trains(params, shared, non_expert):
    ec = ExpertConfig(fx.EXPERTS.experts, shared_experts=shared, non_expert_modules=non_expert)
    method = ExpertSubset.build(CFG, ec)
    state, metrics = fx.run_steps(method, CFG, params, 3)
    assert np.isfinite(float(metrics["loss"]))
    after = method.write_back(params, state["trainable"])
    experts_before, experts_after = (
        params["moe_layers"]["moe"]["experts"],
        after["moe_layers"]["moe"]["experts"],
    )
    selected = np.zeros((CFG.num_moe_layers, CFG.n_routed_experts), bool)
    for layer, ids in ec.experts.items():
        selected[layer - CFG.first_k_dense_replace, ids] = True
    for k in ("gate", "up", "down"):
        a, b = np.asarray(experts_before[k]), np.asarray(experts_after[k])
        np.testing.assert_array_equal(a[~selected], b[~selected])  # bitwise: every other expert row
        assert all(not np.array_equal(a[li, e], b[li, e]) for li, e in zip(*np.nonzero(selected)))
    shared_same = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(params["moe_layers"]["moe"]["shared"]),
            jax.tree.leaves(after["moe_layers"]["moe"]["shared"]),
        )
    )
    assert shared_same != shared
    rest_before, rest_after = _leaves(non_expert_part(params)), _leaves(non_expert_part(after))
    changed = [k for k in rest_before if not np.array_equal(rest_before[k], rest_after[k])]
    if non_expert:
        assert any("router" in k for k in changed) and any("embed" in k for k in changed)
        assert any("attn" in k for k in changed)
    else:
        assert changed == []  # router, attention, norms, embeddings, head: bitwise unchanged


def test_optimizer_state_is_proportional_to_the_selection(params):
    d, f = CFG.hidden_size, CFG.moe_intermediate_size
    n_selected = fx.EXPERTS.num_selected()
    tx = optax.adamw(1e-3)
    esft = ExpertSubset.build(CFG, fx.EXPERTS)
    esft_bytes = tree_bytes(tx.init(esft.init(params)))
    # Adam keeps two float32 moments per trained value, plus a step counter; ESFT's per layer, for
    # as many slots as the layer with the most selected experts.
    slots = CFG.num_moe_layers * max(len(ids) for ids in fx.EXPERTS.experts.values())
    assert esft_bytes == 2 * slots * 3 * d * f * 4 + 4
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert tree_bytes(tx.init(FullFineTune().init(params))) == 2 * n_params * 4 + 4
    assert esft.num_trained(esft.init(params)) == n_selected * 3 * d * f


def test_compact_esft_equals_full_size_masked_reference(params):
    """5 steps of the compact path == 5 steps of full-size grads x row mask, masked AdamW updates."""
    from esft_jax.model.loss import next_token_loss
    from esft_jax.train.optimizer import make_optimizer

    method = ExpertSubset.build(CFG, fx.EXPERTS)
    state, _ = fx.run_steps(method, CFG, params, 5)
    compact = method.write_back(params, state["trainable"])

    mask = jax.tree.map(jnp.zeros_like, params)
    sel = np.zeros((CFG.num_moe_layers, CFG.n_routed_experts, 1, 1), np.float32)
    for layer, ids in fx.EXPERTS.experts.items():
        sel[layer - CFG.first_k_dense_replace, ids] = 1.0
    mask["moe_layers"]["moe"]["experts"] = {
        k: jnp.broadcast_to(sel, v.shape) for k, v in params["moe_layers"]["moe"]["experts"].items()
    }
    tx = make_optimizer(fx.optim())

    def loss(p, batch):
        logits, _ = forward(
            p,
            batch["tokens"],
            CFG,
            segment_ids_bt=batch["segment_ids"],
            positions_bt=batch["positions"],
        )
        s, n = next_token_loss(logits, batch)
        return s / n

    @jax.jit
    def ref_step(p, opt_state, batch):
        g = jax.tree.map(jnp.multiply, jax.grad(loss)(p, batch), mask)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, jax.tree.map(jnp.multiply, updates, mask)), opt_state

    p, opt_state = params, tx.init(params)
    for i in range(5):
        p, opt_state = ref_step(
            p, opt_state, jax.tree.map(lambda x: jnp.asarray(x[0]), fx.token_batch(i))
        )
    for a, b in zip(jax.tree.leaves(compact), jax.tree.leaves(p)):
        assert_adam_close(a, b, model_roundings(CFG), lr=fx.optim().lr, steps=5)
    assert not np.allclose(
        compact["moe_layers"]["moe"]["experts"]["gate"],
        params["moe_layers"]["moe"]["experts"]["gate"],
    )


def test_grad_accumulation_equals_one_large_batch(params):
    from esft_jax.train.optimizer import learning_rate, make_optimizer

    method = ExpertSubset.build(CFG, fx.EXPERTS)
    tx = make_optimizer(fx.optim())
    step = make_train_step(method, CFG, tx, learning_rate(fx.optim()))
    init = {"step": jnp.zeros((), jnp.int32), "trainable": method.init(params)}
    init["opt_state"] = tx.init(init["trainable"])
    one = fx.token_batch(3)
    two = {k: v.reshape(2, 2, -1) for k, v in one.items()}
    s2, m2 = step(jax.tree.map(jnp.copy, init), params, jax.tree.map(jnp.asarray, two))
    s1, m1 = step(jax.tree.map(jnp.copy, init), params, jax.tree.map(jnp.asarray, one))
    assert_float32_close(m1["loss"], m2["loss"], model_roundings(CFG))
    # The summation order differs (micro-batches): see _optim on Adam and rounding.
    for a, b in zip(jax.tree.leaves(s1["trainable"]), jax.tree.leaves(s2["trainable"])):
        assert_adam_close(a, b, model_roundings(CFG), lr=fx.optim().lr, steps=1)


def test_lora_starts_at_the_base_model_and_trains_only_factors(params):
    method = LoRA(rank=4, alpha=8.0)
    tokens = jnp.asarray(fx.token_batch()["tokens"][0])
    base, _ = forward(params, tokens, CFG)
    start, _ = forward(method.materialize(params, method.init(params)), tokens, CFG)
    assert_float32_close(start, base, model_roundings(CFG))
    state, _ = fx.run_steps(method, CFG, params, 2)
    assert all(
        k.startswith(("dense_layers/attn", "moe_layers/attn", "moe_layers/moe/experts"))
        for k in state["trainable"]
    )
    after = method.write_back(params, state["trainable"])
    assert not np.array_equal(
        after["moe_layers"]["attn"]["kv_b"], params["moe_layers"]["attn"]["kv_b"]
    )
    np.testing.assert_array_equal(after["embed"], params["embed"])
    np.testing.assert_array_equal(
        after["moe_layers"]["moe"]["router"], params["moe_layers"]["moe"]["router"]
    )


def test_bfloat16_compute_keeps_float32_master_weights(params):
    from esft_jax.train.optimizer import learning_rate, make_optimizer

    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = CFG.replace(dtype=dtype)
        method = ExpertSubset.build(cfg, fx.EXPERTS)
        tx = make_optimizer(fx.optim())
        trainable = method.init(params)
        state = {
            "step": jnp.zeros((), jnp.int32),
            "trainable": trainable,
            "opt_state": tx.init(trainable),
        }
        step = make_train_step(method, cfg, tx, learning_rate(fx.optim()))
        for i in range(2):
            state, metrics = step(state, params, jax.tree.map(jnp.asarray, fx.token_batch(i)))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["trainable"]))
        losses[dtype] = float(metrics["loss"])
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.02 * losses["float32"]


@pytest.mark.parametrize(
    "method",
    [
        ExpertSubset.build(CFG, ExpertConfig(fx.EXPERTS.experts, True, True)),
        LoRA(rank=4, alpha=8.0),  # test_lora_starts_...'s: its compiled train step is reused
        FullFineTune(),
    ],
    ids=["esft+flags", "lora", "fft"],
)
def test_written_back_params_compute_what_training_computed(params, method):
    """The export path (write_back) and the training forward (materialize) are the same model."""
    state, _ = fx.run_steps(method, CFG, params, 2)
    tokens = jnp.asarray(fx.token_batch(9)["tokens"][0])
    trained, _ = forward(method.materialize(params, state["trainable"]), tokens, CFG)
    exported, _ = forward(method.write_back(params, state["trainable"]), tokens, CFG)
    base, _ = forward(params, tokens, CFG)
    assert_float32_close(exported, trained, model_roundings(CFG))
    assert np.abs(np.asarray(trained) - np.asarray(base)).max() > 1e-3


def test_shared_experts_only(params):
    """The paper's "shared experts only" ablation: no routed expert trains."""
    method = ExpertSubset.build(CFG, ExpertConfig({1: [], 2: [], 3: []}, shared_experts=True))
    state, _ = fx.run_steps(method, CFG, params, 2)
    assert list(state["trainable"]) == ["shared"] and list(state["trainable"]["shared"]) == [
        "shared"
    ]
    after = method.write_back(params, state["trainable"])
    np.testing.assert_array_equal(
        after["moe_layers"]["moe"]["experts"]["gate"],
        params["moe_layers"]["moe"]["experts"]["gate"],
    )
    assert not np.array_equal(
        after["moe_layers"]["moe"]["shared"]["up"], params["moe_layers"]["moe"]["shared"]["up"]
    )

"""ESFT's trained rows in the per-layer override layout [L, S, ...] (train/esft.py): training is
bit-identical to the compact layout [N, ...] gathered into the overrides every step (the layout
before, kept here as the reference), the unused slots stay exactly zero, and the compiled step holds
no gathered copy or scattered gradient of the rows."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_fixtures as fx

from esft_jax.app.commands import train as loop
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.expert_config import ExpertConfig
from esft_jax.model import init_params
from esft_jax.model.moe import moe_block
from esft_jax.train import method as method_module
from esft_jax.train.esft import ExpertSubset
from esft_jax.train.method import save_adapter
from esft_jax.train.optimizer import learning_rate, make_optimizer
from esft_jax.train.step import make_train_step
from esft_jax.train.trainable import Params, tree_size

CFG = fx.tiny_config()


@dataclasses.dataclass(frozen=True, eq=False)
class CompactRows(ExpertSubset):
    """The reference: rows [N, ...] in config order, gathered into the overrides (unused slots
    reading row 0) and so scattered back in the gradient."""

    def init(self, frozen: Params) -> Params:
        experts = frozen["moe_layers"]["moe"]["experts"]
        layer, expert = self.rows[:, 0], self.rows[:, 1]
        return {
            "experts": {k: jnp.asarray(w[layer, expert], jnp.float32) for k, w in experts.items()}
        }

    def num_trained(self, trainable: Params) -> int:
        return tree_size(trainable)

    def _moe(self, frozen: Params, **changes) -> Params:
        moe_layers = dict(frozen["moe_layers"])
        moe_layers["moe"] = {**moe_layers["moe"], **changes}
        return {**frozen, "moe_layers": moe_layers}

    def materialize(self, frozen: Params, trainable: Params) -> Params:
        slots = np.zeros(self.slot_ids.shape, np.int32)
        slots[self.rows[:, 0], self.row_slots] = np.arange(len(self.rows))
        override = {k: rows[slots] for k, rows in trainable["experts"].items()}
        return self._moe(frozen, override={**override, "ids": jnp.asarray(self.slot_ids)})

    def write_back(self, frozen: Params, trainable: Params) -> Params:
        layer, expert = self.rows[:, 0], self.rows[:, 1]
        experts = {
            k: w.at[layer, expert].set(trainable["experts"][k].astype(w.dtype))
            for k, w in frozen["moe_layers"]["moe"]["experts"].items()
        }
        return self._moe(frozen, experts=experts)


@pytest.fixture(scope="module")
def params():
    return fx.tiny_params()


# XLA's defaults, as `esft train` compiles (conftest.py lowers them for speed): with the CPU
# emitters of the tests, the same elementwise Adam update compiled for [6, 32, 64] and for
# [3, 3, 32, 64] can round an element differently.
USER_COMPILE = {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": True}


def _train(method, params, steps: int, accum: int):
    """(per-step metrics, final state) of `steps` steps on token_batch(i) split in `accum`."""
    tx = make_optimizer(fx.optim())
    trainable = method.init(params)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable}
    state["opt_state"] = tx.init(trainable)
    batches = [
        jax.tree.map(lambda v: jnp.asarray(v.reshape(accum, 4 // accum, -1)), fx.token_batch(i))
        for i in range(steps)
    ]
    step = make_train_step(method, CFG, tx, learning_rate(fx.optim()))
    step = step.lower(state, params, batches[0]).compile(compiler_options=USER_COMPILE)
    history = []
    for batch in batches:
        state, metrics = step(state, params, batch)
        history.append({k: np.asarray(v) for k, v in metrics.items()})
    return history, state


@pytest.mark.parametrize("accum", [1, 2])
def test_training_is_bit_identical_to_the_compact_layout(params, tmp_path, accum):
    """Same losses, gradient norms and adapter bytes; weight decay and clipping on, layers ragged."""
    ec = fx.EXPERTS  # 3, 1 and 2 experts: slots unused in two layers
    per_layer, state = _train(ExpertSubset.build(CFG, ec), params, 4, accum)
    reference, ref_state = _train(CompactRows.build(CFG, ec), params, 4, accum)
    for ours, ref in zip(per_layer, reference):
        assert ours.keys() == ref.keys()
        for k in ours:
            np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    a = save_adapter(tmp_path / "a", CFG, ExpertSubset.build(CFG, ec), params, state["trainable"])
    b = save_adapter(
        tmp_path / "b", CFG, CompactRows.build(CFG, ec), params, ref_state["trainable"]
    )
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_unused_slots_stay_zero_and_get_no_gradient(params):
    method = ExpertSubset.build(CFG, fx.EXPERTS)
    unused = method.slot_ids < 0
    assert unused.any()
    _, state = _train(method, params, 2, 1)
    adam = [optax.tree.get(state["opt_state"], k) for k in ("mu", "nu")]
    for tree in (state["trainable"], *adam):
        for rows in tree["experts"].values():
            assert np.all(np.asarray(rows)[unused] == 0)
            assert np.all(np.abs(np.asarray(rows)[~unused]).max(axis=-1) > 0)


def test_an_unused_slot_gets_no_gradient_even_from_a_nan(params):
    """The dense strategy multiplies every slot's output by its routing weight, 0 for an unused slot:
    without the mask (model/moe.py) a NaN anywhere in the output's cotangent would reach it."""
    cfg = CFG.replace(moe_strategy="dense")
    method = ExpertSubset.build(cfg, fx.EXPERTS)
    moe = method.materialize(params, method.init(params))["moe_layers"]["moe"]
    moe = jax.tree.map(lambda x: x[1], moe)  # the second MoE layer: one expert, two unused slots
    ids, rows = moe["override"].pop("ids"), moe.pop("override")
    unused = np.asarray(ids) < 0
    assert unused.sum() == 2
    x_btd = jax.random.normal(jax.random.key(0), (2, 8, cfg.hidden_size))

    def y(rows):
        return moe_block({**moe, "override": {**rows, "ids": ids}}, x_btd, cfg).y_btd

    out, vjp = jax.vjp(y, rows)
    (grad,) = vjp(jnp.full_like(out, jnp.nan))
    for g in grad.values():
        assert np.all(np.asarray(g)[unused] == 0) and np.isnan(np.asarray(g)[~unused]).all()


def test_the_step_holds_no_gathered_copy_or_scattered_gradient_of_the_rows():
    """Compiled for abstract arguments (nothing allocated): the compact layout's step needs at least
    one more copy of the trained rows in temporaries (the gathered overrides, the scattered
    gradient)."""
    cfg = fx.tiny_config(hidden_size=128, moe_intermediate_size=256)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    experts = ExpertConfig({1: [0, 1, 2, 3], 2: [4, 5, 6, 7], 3: [8, 9, 10, 11]})
    tx = make_optimizer(fx.optim())
    batch = {k: jax.ShapeDtypeStruct((1, 1, 8), jnp.int32) for k in fx.token_batch()}
    temporaries = {}
    for layout in (ExpertSubset, CompactRows):
        method = layout.build(cfg, experts)
        trainable = jax.eval_shape(method.init, params)
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "trainable": trainable}
        state["opt_state"] = jax.eval_shape(tx.init, trainable)
        step = make_train_step(method, cfg, tx, learning_rate(fx.optim()))
        compiled = step.lower(state, params, batch).compile()
        temporaries[layout] = compiled.memory_analysis().temp_size_in_bytes
    rows_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainable))
    assert temporaries[ExpertSubset] <= temporaries[CompactRows] - rows_bytes


def test_a_checkpoint_of_the_compact_layout_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """A workdir checkpointed by the earlier layout: one error line, the checkpoint left as it is."""
    c = fx.train_config(tmp_path, steps=1, checkpoint_every=1, eval_every=1)
    with monkeypatch.context() as m:
        m.setitem(method_module.REGISTRY, "esft", CompactRows.from_settings)
        loop.train(c, progress=False)
    saved = sorted(p.name for p in (tmp_path / "run_esft" / "checkpoints").iterdir())
    with pytest.raises(CheckpointError) as refused:  # the same command, rerun
        loop.train(c, progress=False)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{tmp_path}/run_esft/checkpoints/1: ")
    # the first of the rows' arrays (or their Adam moments) read: [N, d, f] -> [L, S, d, f]
    assert re.search(r"shape \(6, (\d+), (\d+)\) where this run has \(3, 3, \1, \2\)", message)
    assert sorted(p.name for p in (tmp_path / "run_esft" / "checkpoints").iterdir()) == saved

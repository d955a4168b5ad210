"""The jitted train step (train/step.py) on a mesh: its new state is pinned to the old one's
shardings, and the donated state is updated in place (every buffer aliased, the old arrays deleted)."""

import jax
import jax.numpy as jnp
import numpy as np
import train_fixtures as fx
from jax.sharding import NamedSharding

from esft_jax import sharding
from esft_jax.model import param_axes
from esft_jax.train.esft import ExpertSubset
from esft_jax.train.optimizer import learning_rate, make_optimizer
from esft_jax.train.step import make_train_step, state_shardings

CFG = fx.tiny_config()


def test_the_donated_state_is_updated_in_place_with_its_shardings():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    axes = param_axes(CFG)
    frozen = sharding.shard_params(fx.tiny_params(), axes, mesh)
    method = ExpertSubset.build(CFG, fx.EXPERTS)
    trainable = method.init(frozen)
    trainable = jax.device_put(
        trainable, sharding.param_shardings(method.axes(axes, trainable), mesh)
    )
    tx = make_optimizer(fx.optim())
    shardings = state_shardings(tx, trainable)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable}
    state = jax.device_put({**state, "opt_state": tx.init(trainable)}, shardings)
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))
    assert shardings["trainable"]["experts"]["gate"].spec == jax.P(None, None, "fsdp", "tensor")
    rows = sharding.logical_to_spec((None, "act_batch", None), dict(mesh.shape))
    batch = jax.device_put(fx.token_batch(), NamedSharding(mesh, rows))  # [1, B, T]

    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    step = make_train_step(method, CFG, tx, learning_rate(fx.optim()), shardings=shardings)
    with jax.set_mesh(mesh):
        compiled = step.lower(state, frozen, batch).compile()
        new, metrics = step(state, frozen, batch)
    assert compiled.memory_analysis().alias_size_in_bytes == per_device
    assert all(x.is_deleted() for x in jax.tree.leaves(state))
    assert jax.tree.map(lambda x: x.sharding, new) == shardings
    assert np.isfinite(float(metrics["loss"])) and int(new["step"]) == 1

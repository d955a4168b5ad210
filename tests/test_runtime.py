"""runtime.load_model is the one place weights go onto devices: checkpoint or random, every leaf
comes back placed by its logical axes on the mesh (or on the default device without one)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import train_fixtures as fx

from esft_jax import sharding
from esft_jax.app import runtime
from esft_jax.model import init_params, param_axes


@pytest.mark.parametrize("mesh_shape", [None, {"fsdp": 2, "expert": 4}], ids=str)
@pytest.mark.parametrize("source", ["checkpoint", "random"])
def test_load_model_places_every_weight(tmp_path, source, mesh_shape):
    if mesh_shape and jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    c = fx.train_config(tmp_path)
    if source == "random":
        c.checkpoint = runtime.RANDOM_WEIGHTS
    mesh = sharding.make_mesh(mesh_shape) if mesh_shape else None
    cfg, params = runtime.load_model(c, mesh)
    leaves = jax.tree.leaves(params)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    if mesh is not None:
        want = jax.tree.leaves(sharding.param_shardings(param_axes(cfg), mesh))
        assert [x.sharding for x in leaves] == want
    if source == "random":  # the seeded weights of c.model, wherever they are placed
        for got, expected in zip(leaves, jax.tree.leaves(init_params(cfg, jax.random.key(c.seed)))):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))

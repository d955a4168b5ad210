"""A forward sharded over 8 simulated devices (data 2 x expert 4) equals the single-device forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from numerics import assert_float32_close, model_roundings

from esft_jax import sharding
from esft_jax.model import ModelConfig, forward, init_params, param_axes
from esft_jax.model import experts as experts_module

_forward = jax.jit(forward, static_argnums=2)


def _setup(strategy, **runtime):
    cfg = ModelConfig(
        num_hidden_layers=3,
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_strategy=strategy,
        q_lora_rank=24,
        **runtime,
    )
    params = init_params(cfg, jax.random.key(0))
    params["moe_layers"]["moe"]["router"] *= 15  # a router that discriminates
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 24)))
    segments = np.ones((8, 24), np.int32)
    segments[1, 20:] = 0
    segments[3, 12:] = 2  # two packed documents
    return cfg, params, tokens, jnp.asarray(segments)


@pytest.mark.parametrize(
    "strategy,exchange",
    [
        ("capacity", "psum"),
        ("blocked", "psum"),
        ("spill", "psum"),
        ("ragged", "psum"),
        ("dense", "psum"),
        ("blocked", "all_to_all"),
        ("capacity", "all_to_all"),
    ],
)
def test_sharded_forward_equals_single_device(strategy, exchange, monkeypatch):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    # spill's batched pass at this small size too
    monkeypatch.setattr(experts_module, "SPILL_MIN_ROWS", 1)
    cfg, params, tokens, segments = _setup(strategy, expert_parallel=exchange)
    ref_logits, ref_routing = _forward(params, tokens, cfg, segment_ids_bt=segments)

    mesh = sharding.make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
    sharded = sharding.shard_params(params, param_axes(cfg), mesh)
    experts = sharded["moe_layers"]["moe"]["experts"]["gate"]
    assert experts.sharding.spec[1] == "expert" and len(experts.addressable_shards) == 8
    assert experts.addressable_shards[0].data.shape[1] == cfg.n_routed_experts // 4
    batch = NamedSharding(mesh, sharding.logical_to_spec(("act_batch", None), dict(mesh.shape)))
    with jax.set_mesh(mesh):
        logits, routing = _forward(
            sharded,
            jax.device_put(tokens, batch),
            cfg,
            segment_ids_bt=jax.device_put(segments, batch),
        )
    assert_float32_close(logits, ref_logits, model_roundings(cfg))
    np.testing.assert_array_equal(
        np.asarray(routing.expert_ids), np.asarray(ref_routing.expert_ids)
    )
    assert_float32_close(routing.gate_weights, ref_routing.gate_weights, model_roundings(cfg))
    np.testing.assert_array_equal(np.asarray(routing.dropped), 0)


def test_all_to_all_capacity_drops_and_counts():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg, params, tokens, segments = _setup(
        "blocked", expert_parallel="all_to_all", capacity_factor=0.5
    )
    mesh = sharding.make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
    with jax.set_mesh(mesh):
        _, routing = _forward(
            sharding.shard_params(params, param_axes(cfg), mesh),
            tokens,
            cfg,
            segment_ids_bt=segments,
        )
    per_device = 8 // 8 * 24 * 4  # rows x tokens x k assignments each device sends
    rows = -(-per_device // 8)  # ceil(0.5 * N * k / 4 shards) buffer rows per destination
    # per layer: a device keeps at most 4 * rows of its assignments
    dropped = np.asarray(routing.dropped)
    assert np.all((8 * (per_device - 4 * rows) <= dropped) & (dropped < 8 * per_device))


def test_logical_rules():
    spec = sharding.logical_to_spec(
        ("layers", "expert", "embed", "expert_mlp"),
        {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1},
    )
    assert tuple(spec) == (None, "expert", None, None)  # size-1 mesh axes are dropped
    spec = sharding.logical_to_spec(
        ("act_batch", None), {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    )
    assert tuple(spec) == (("data", "fsdp"), None)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh({"data": 4, "expert": 4}, jax.devices()[:8])
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 2})

"""Routed experts held in FP8 on the device (model/quant.py) compute what the same experts
dequantised up front compute: outputs, ESFT's gradients, its write-back, and the planner's bytes."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from numerics import assert_float32_close, model_roundings
from train_fixtures import esft_value_and_grad

from esft_jax.checkpoint import fp8
from esft_jax.expert_config import ExpertConfig
from esft_jax.model import ModelConfig, forward, init_params, quant
from esft_jax.model.params import abstract_params
from esft_jax.train.esft import ExpertSubset

BLOCK = (16, 32)  # the file's [out, in] block: partial blocks at these sizes
CFG = ModelConfig(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=64,
    moe_intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=2,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    expert_fp8_block=BLOCK,
)


def _quantized_params(cfg: ModelConfig = CFG, seed: int = 0) -> dict:
    """Random params whose FP8 experts span FP8's range, with varied block scales."""
    params = init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    experts = dict(params["moe_layers"]["moe"]["experts"])
    for name in quant.QUANTIZED:
        shape = experts[name].shape
        experts[name] = jnp.asarray(rng.normal(0, 80, shape).astype(ml_dtypes.float8_e4m3fn))
        scale = experts[name + quant.SCALE].shape
        experts[name + quant.SCALE] = jnp.asarray(rng.uniform(2e-4, 1e-3, scale), jnp.float32)
    params["moe_layers"]["moe"]["experts"] = experts
    return params


def _dequantized(params: dict, cfg: ModelConfig = CFG) -> tuple[ModelConfig, dict]:
    """The same model with its experts dequantised up front (as a bf16/f32 load would)."""
    experts = params["moe_layers"]["moe"]["experts"]
    plain = {
        k: v.astype(cfg.param_dtype)
        for k, v in quant.dequantize_experts(experts, cfg.expert_scheme, cfg.param_dtype).items()
    }
    out = {**params, "moe_layers": {**params["moe_layers"]}}
    out["moe_layers"]["moe"] = {**params["moe_layers"]["moe"], "experts": plain}
    return cfg.replace(expert_fp8_block=()), out


def test_dequantize_equals_the_checkpoint_readers():
    """Our [in, out] layout with the block transposed gives what checkpoint/fp8.py (bit-equal to
    transformers' Fp8Dequantize) gives on the file's [out, in] matrix."""
    rng = np.random.default_rng(1)
    w_oi = rng.normal(0, 100, (2, 40, 48)).astype(ml_dtypes.float8_e4m3fn)  # [E, out, in]
    scale = rng.uniform(1e-4, 1e-2, fp8.scale_shape(w_oi.shape, BLOCK)).astype(np.float32)
    ours = quant.Fp8Blocks(quant.block_io(BLOCK)).dequantize(
        jnp.asarray(w_oi.swapaxes(1, 2)), jnp.asarray(scale.swapaxes(1, 2)), jnp.bfloat16
    )
    theirs = fp8.dequantize(w_oi, scale, BLOCK, ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(ours).swapaxes(1, 2), theirs)


def test_quantize_keeps_each_value_within_fp8_rounding():
    w = jax.random.normal(jax.random.key(2), (3, 40, 70)) * jnp.linspace(0.01, 10, 70)
    scheme = quant.Fp8Blocks((16, 32))
    values, scale = scheme.quantize(w)
    assert values.dtype == jnp.dtype(quant.FP8) and scale.shape == (3, 3, 3)
    back = scheme.dequantize(values, scale, jnp.float32)
    per_value_scale = jnp.repeat(jnp.repeat(scale, 16, 1), 32, 2)[:, :40, :70]
    # E4M3: 3 mantissa bits (half an ulp: 2^-4 relative); subnormals: 2^-10 of the scale x 448
    bound = jnp.maximum(jnp.abs(w) * 2.0**-4, per_value_scale * 2.0**-10)
    assert bool(jnp.all(jnp.abs(back - w) <= bound * 1.0001))


@pytest.mark.parametrize("strategy", ["blocked", "capacity", "dense"])
def test_fp8_experts_give_the_outputs_of_the_dequantized_ones(strategy):
    cfg = CFG.replace(moe_strategy=strategy)
    params = _quantized_params(cfg)
    plain_cfg, plain = _dequantized(params, cfg)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, CFG.vocab_size)
    ours, _ = forward(params, tokens, cfg)
    theirs, _ = forward(plain, tokens, plain_cfg)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_esft_on_fp8_experts_trains_as_on_the_dequantized_ones():
    """ESFT's trained rows start as the dequantised experts; the loss equals that on the
    dequantised base and its gradient to float32 rounding; the frozen FP8 stack is never changed;
    write_back re-quantises only the trained experts, within FP8's rounding of the trained values."""
    params = _quantized_params()
    plain_cfg, plain = _dequantized(params)
    selection = ExpertConfig({layer: [1, 4] for layer in CFG.moe_layer_ids})
    ours, theirs = ExpertSubset.build(CFG, selection), ExpertSubset.build(plain_cfg, selection)
    rows = ours.init(params)
    jax.tree.map(np.testing.assert_array_equal, rows, theirs.init(plain))
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, CFG.vocab_size)
    before = jax.tree.map(np.array, params)
    value, grads = esft_value_and_grad(ours, CFG, params, rows, tokens)
    value_plain, grads_plain = esft_value_and_grad(theirs, plain_cfg, plain, rows, tokens)
    assert float(value) == float(value_plain)
    jax.tree.map(  # the backward fuses the dequantisation differently: float32 rounding apart
        lambda a, b: assert_float32_close(a, b, model_roundings(CFG)), grads, grads_plain
    )
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, params))

    trained = optax.apply_updates(rows, jax.tree.map(lambda g: -0.1 * g / jnp.abs(g).max(), grads))
    merged = ours.write_back(params, trained)["moe_layers"]["moe"]["experts"]
    stack = params["moe_layers"]["moe"]["experts"]
    for name in quant.QUANTIZED:
        untouched = np.ones(stack[name].shape[:2], bool)
        untouched[:, [1, 4]] = False
        for key in (name, name + quant.SCALE):  # the other experts byte for byte
            np.testing.assert_array_equal(
                np.asarray(merged[key])[untouched], np.asarray(stack[key])[untouched]
            )
        back = CFG.expert_scheme.dequantize(
            merged[name][:, [1, 4]], merged[name + quant.SCALE][:, [1, 4]], jnp.float32
        )
        exact = trained["experts"][name].astype(CFG.param_dtype)
        assert float(jnp.max(jnp.abs(back - exact) - 2.0**-4 * jnp.abs(exact))) <= 1e-3


def test_the_planner_counts_fp8_experts_at_their_bytes():
    held = {
        k: v.size * v.dtype.itemsize
        for k, v in abstract_params(CFG)["moe_layers"]["moe"]["experts"].items()
    }
    e, d, f = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size
    layers = CFG.num_moe_layers
    assert held["gate"] == layers * e * d * f  # one byte a value
    assert held["gate_scale"] == layers * e * -(-d // BLOCK[1]) * -(-f // BLOCK[0]) * 4
    assert held["down_scale"] == layers * e * -(-f // BLOCK[1]) * -(-d // BLOCK[0]) * 4


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_methods_that_train_every_expert_refuse_fp8_experts(method):
    from esft_jax.app import config_files
    from esft_jax.app.commands.train import method_settings
    from esft_jax.model.config import ConfigError
    from esft_jax.train.method import build_method

    c = config_files.load("configs/train.py", [f"method={method}"])
    with pytest.raises(ConfigError, match=f"method={method} trains every routed expert"):
        build_method(c.method, method_settings(c), CFG)


def test_auto_runs_a_quantized_stack_blocked_on_every_backend():
    """A grouped matmul (ragged, tokamax) takes a layer's whole stack: dequantised, that is the bf16
    stack the quantised one saves; "auto" takes the blocked loop (one expert at a time) instead."""
    from esft_jax.model.experts import resolve_strategy

    for platform in ("cpu", "gpu", "tpu"):
        assert resolve_strategy("auto", platform, quantized=True) == "blocked"
    assert resolve_strategy("auto", "tpu") in ("ragged", "tokamax")
    assert resolve_strategy("ragged", "tpu", quantized=True) == "ragged"  # asked for: as asked

"""MXFP4 (gpt-oss expert weights): our numpy dequantiser against transformers', and the test quantiser."""

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from esft_jax.checkpoint.mxfp4 import FP4_MAGNITUDES, dequantize, is_mxfp4, packed_names, quantize

# Dequantised [E, in, out]: gate_up [E, d, 2f], down [E, f, d] (in must be a multiple of 32).
SHAPES = {
    "gate_up_2f10_d64": (3, 64, 10),
    "gate_up_2f64_d96": (3, 96, 64),
    "down_f32_d96": (3, 32, 96),
}


def _reference(blocks: np.ndarray, scales: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """transformers' own dequantisation (its pure-torch path)."""
    return convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype
    )


def _random_weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Normal values with magnitudes spread over many binades, so blocks get different scales."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 4, shape[:-1] + (1,))).astype(
        np.float32
    )


def _assert_matches_transformers(blocks: np.ndarray, scales: np.ndarray) -> None:
    ours32 = dequantize(blocks, scales)
    ref32 = _reference(blocks, scales, torch.float32).numpy()
    assert ours32.shape == ref32.shape and ours32.dtype == np.float32
    np.testing.assert_array_equal(ours32.view(np.uint32), ref32.view(np.uint32))
    ours16 = dequantize(blocks, scales, ml_dtypes.bfloat16)
    ref16 = _reference(blocks, scales, torch.bfloat16).view(torch.int16).numpy()
    assert ours16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours16.view(np.int16), ref16)
    np.testing.assert_array_equal(
        ours16.view(np.int16), ours32.astype(ml_dtypes.bfloat16).view(np.int16)
    )


@pytest.mark.parametrize("name", SHAPES)
def test_quantized_tensor_dequantizes_like_transformers(name):
    x_eio = _random_weights(SHAPES[name], seed=0)
    blocks, scales = quantize(x_eio)
    n_exp, n_in, n_out = x_eio.shape
    assert blocks.dtype == scales.dtype == np.uint8
    assert blocks.shape == (n_exp, n_out, n_in // 32, 16) and scales.shape == (
        n_exp,
        n_out,
        n_in // 32,
    )
    _assert_matches_transformers(blocks, scales)


def test_every_byte_and_exponent_dequantizes_like_transformers():
    """Random bytes over the whole uint8 range, every nibble and every exponent (incl. sub/overflow)."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (2, 256, 3, 16), dtype=np.uint8)
    scales = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (2, 256, 3)).copy()
    rng.shuffle(scales, axis=1)
    _assert_matches_transformers(blocks, scales)


def test_the_model_dequantizes_in_its_layout_as_the_loader_does():
    """model/quant.py's Mxfp4 on our [in/2, out] / [in/32, out] layout equals the loader's (bit-equal
    to transformers') for every byte and the exponents of real weights (2^-40 .. 2^40; XLA:CPU
    flushes float32 subnormals, which no real weight's block is)."""
    import jax.numpy as jnp

    from esft_jax.checkpoint.mxfp4 import to_file
    from esft_jax.model import quant

    rng = np.random.default_rng(4)
    values = rng.integers(0, 256, (2, 48, 81), dtype=np.uint8)  # [E, in/2, out]: in = 96
    scales = rng.integers(87, 168, (2, 3, 81), dtype=np.uint8)
    ours = quant.Mxfp4().dequantize(jnp.asarray(values), jnp.asarray(scales), jnp.float32)
    np.testing.assert_array_equal(np.asarray(ours), dequantize(*to_file(values, scales)))


def test_chunks_over_experts_give_the_same_result():
    blocks, scales = quantize(_random_weights((5, 64, 12), seed=2))
    whole = dequantize(blocks, scales)
    for chunk in (1, 2 * 12 * 64, 3 * 12 * 64):
        np.testing.assert_array_equal(dequantize(blocks, scales, chunk_values=chunk), whole)


@pytest.mark.parametrize("name", SHAPES)
def test_quantizer_error_is_within_half_a_grid_step(name):
    x_eio = _random_weights(SHAPES[name], seed=3)
    blocks, scales = quantize(x_eio)
    scale_eoi = np.repeat(np.ldexp(1.0, scales.astype(np.int64) - 127), 32, axis=-1)
    scale_eio = scale_eoi.transpose(0, 2, 1)
    x64 = x_eio.astype(np.float64)
    mag = np.abs(x64) / scale_eio
    assert mag.max() <= 6.0  # the block scale leaves no value clipped
    # each block scale is the smallest power of two that does: with half of it the block max would clip
    block_max = np.abs(x64).transpose(0, 2, 1).reshape(*scales.shape, 32).max(axis=-1)
    assert np.all(block_max / np.ldexp(1.0, scales.astype(np.int64) - 127) > 3.0)
    hi = np.searchsorted(FP4_MAGNITUDES.astype(np.float64), mag).clip(1, len(FP4_MAGNITUDES) - 1)
    half_step = (FP4_MAGNITUDES[hi] - FP4_MAGNITUDES[hi - 1]).astype(np.float64) / 2
    err = np.abs(dequantize(blocks, scales).astype(np.float64) - x64)
    assert np.all(err <= half_step * scale_eio)


def test_grid_values_round_trip_exactly():
    """Values already on a block's E2M1 grid (with a 6 in each block) come back unchanged."""
    rng = np.random.default_rng(4)
    grid = np.concatenate([FP4_MAGNITUDES, -FP4_MAGNITUDES])
    vals = grid[rng.integers(0, 16, (2, 8, 64))].reshape(2, 8, 2, 32)
    vals[..., 0] = 6.0
    x_eoi = np.ldexp(vals, rng.integers(-20, 20, (2, 8, 2, 1))).reshape(2, 8, 64).astype(np.float32)
    x_eio = x_eoi.transpose(0, 2, 1)
    np.testing.assert_array_equal(dequantize(*quantize(x_eio)), x_eio)


def test_packed_names():
    base = "model.layers.0.mlp.experts.gate_up_proj"
    assert packed_names(base) == (base + "_blocks", base + "_scales")
    assert is_mxfp4({base + "_blocks", base + "_scales", "other"}, base)
    assert not is_mxfp4({base, base + "_blocks"}, base)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="not"):
        dequantize(np.zeros((2, 4, 3, 16), np.uint8), np.zeros((2, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="multiple"):
        quantize(np.zeros((2, 48, 4), np.float32))

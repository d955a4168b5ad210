"""attention_impl="dot_product" (jax.nn.dot_product_attention) and "blockwise" (exact attention in
blocks, model/blockwise_attention.py) against the reference attention, for every family's attention
options: MLA with q/k and v head dims apart, grouped-query heads, biases, QK norms, clamping,
partial rotary, sliding windows, sinks; packed and padded rows; blocks that do not divide the
length. Through the KV cache: tests/test_families.py::test_cache_equals_full_forward."""

import functools
import re

import family_configs as fc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_float32_close, model_roundings

from esft_jax.model import forward
from esft_jax.model.attention import dot_product_attention, softmax_attention
from esft_jax.model.blockwise_attention import blockwise_attention
from esft_jax.model.loss import next_token_loss
from esft_jax.model.mask import attention_mask, dense

IMPLS = {"dot_product": {}, "blockwise": {"attention_block": 8}}  # 8 does not divide T = 20


def _loss(params, tokens, segments, cfg):
    logits, _ = forward(params, tokens, cfg, segment_ids_bt=segments)
    batch = {"tokens": tokens, "segment_ids": segments, "loss_mask": segments}
    return next_token_loss(logits, batch)[0], logits


_value_and_grad = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", fc.FAMILIES)
def test_impl_equals_reference(family, impl):
    ref_cfg = fc.config(family, moe_strategy="dense")
    assert ref_cfg.attention_impl == "reference"
    params, (tokens, segments) = fc.params(ref_cfg), fc.batch(ref_cfg)
    (_, want_logits), want = _value_and_grad(params, tokens, segments, ref_cfg)
    cfg = ref_cfg.replace(attention_impl=impl, **IMPLS[impl])
    (_, logits), grads = _value_and_grad(params, tokens, segments, cfg)
    n = model_roundings(cfg)
    assert_float32_close(logits, want_logits, n)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
        assert_float32_close(g, w, 4 * n, err_msg=jax.tree_util.keystr(path))


def _inputs(b=2, t=5, s=5, h=4, g=2, k=12, v=8, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, k)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, s, g, k)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(b, s, g, v)), jnp.float32)
    return q, keys, values, jnp.asarray(rng.normal(size=h), jnp.float32)


def _reference(q, keys, values, mask, scale, sinks):
    r = q.shape[2] // keys.shape[2]
    scores = jnp.einsum("bthk,bshk->bhts", q, jnp.repeat(keys, r, axis=2)) * scale
    return softmax_attention(scores, dense(mask), jnp.repeat(values, r, axis=2), sinks)


def test_fully_masked_rows_match_with_and_without_sinks():
    """A query row with no key to attend to (padding): the reference's uniform row without sinks,
    all mass on the sink (output 0) with them; every path alike, and finite."""
    q, keys, values, sinks = _inputs()
    segments = jnp.asarray([[1, 1, 2, 2, 0], [0, 3, 3, 3, 3]])
    mask = attention_mask(segments, segments, 0)
    for s in (None, sinks):
        want = _reference(q, keys, values, mask, 0.3, s)
        for got in (
            dot_product_attention(q, keys, values, dense(mask), 0.3, s),
            blockwise_attention(q, keys, values, mask, 0.3, s, q_block=2, k_block=3),
        ):
            assert np.all(np.isfinite(got))
            assert_float32_close(got, want, 8 * np.sqrt(5))


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_blockwise_through_a_cache_equals_reference(window, with_sinks):
    """Queries at their own positions of a longer cache (rows at different offsets, padding and
    unfilled positions, packed segments), query and key blocks of different sizes dividing neither
    length: the output and the gradients of q, k, v and the sinks."""
    q, keys, values, sinks = _inputs(t=7, s=11, seed=1)
    key_segments = jnp.asarray(
        [[1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0], [0, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3]]
    )
    query_segments = jnp.asarray([[2, 2, 2, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3, 3]])
    mask = attention_mask(query_segments, key_segments, jnp.asarray([3, 4]), window)
    cotangent = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, 4, 8)), jnp.float32)

    def loss(attention, q, keys, values, sinks):
        return jnp.sum(
            attention(q, keys, values, mask, 0.3, sinks if with_sinks else None) * cotangent
        )

    blockwise = lambda *a: blockwise_attention(*a, q_block=3, k_block=4)  # noqa: E731
    for want, got in zip(
        jax.value_and_grad(loss, argnums=(1, 2, 3, 4))(_reference, q, keys, values, sinks),
        jax.value_and_grad(loss, argnums=(1, 2, 3, 4))(blockwise, q, keys, values, sinks),
    ):
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            assert_float32_close(g, w, 8 * np.sqrt(11))


def test_blockwise_never_holds_the_scores():
    """Forward + backward of attention at T = S = 2048 in a scan over two layers (with and without
    remat, as the model runs it): no buffer of T * S elements in the compiled program (the
    reference's float32 scores are 16 MiB a head), temporaries under a quarter of the scores'. In a
    layer scan, JAX hoists what depends only on loop-invariant values (the mask) out of the loop;
    blockwise attention must not let it precompute every block's mask."""
    b, t, h = 1, 2048, 2
    q, keys, values, _ = _inputs(b=b, t=t, s=t, h=h, g=1, k=16, v=16)
    segments = jnp.ones((b, t), jnp.int32)

    def loss(attention, remat, q, keys, values):
        def layer(x, _):
            y = attention(x, keys, values, attention_mask(segments, segments, 0), 0.3, None)
            return x + y, None

        return jnp.sum(jax.lax.scan(jax.checkpoint(layer) if remat else layer, q, length=2)[0])

    def compiled(attention, remat):
        step = jax.jit(jax.grad(loss, argnums=(2, 3, 4)), static_argnums=(0, 1))
        return step.lower(attention, remat, q, keys, values).compile()

    def largest(executable) -> int:  # elements of the largest array shape in the optimized HLO
        shapes = re.findall(r"(?:f32|pred|bf16|s32)\[([\d,]+)\]", executable.as_text())
        return max(np.prod([int(d) for d in s.split(",")]) for s in shapes)

    scores_bytes = 4 * b * h * t * t
    blockwise = functools.partial(blockwise_attention, q_block=256, k_block=256)
    for remat in (False, True):
        reference = compiled(_reference, remat)
        assert largest(reference) >= h * t * t  # the check sees the scores where they exist
        assert reference.memory_analysis().temp_size_in_bytes >= scores_bytes
        got = compiled(blockwise, remat)
        assert largest(got) < t * t
        assert got.memory_analysis().temp_size_in_bytes < scores_bytes / 4


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_dot_product_in_bfloat16_matches_the_reference_in_bfloat16(family):
    """In bf16 (jax.nn.dot_product_attention wants q, k, v of one dtype; MLA's rotated half is
    concatenated to the rest), the two paths agree to bf16 rounding."""
    ref_cfg = fc.config(family, moe_strategy="dense", dtype="bfloat16")
    params, (tokens, segments) = fc.params(ref_cfg), fc.batch(ref_cfg)
    run = jax.jit(forward, static_argnums=2)
    want, _ = run(params, tokens, ref_cfg, segment_ids_bt=segments)
    cfg = ref_cfg.replace(attention_impl="dot_product")
    got, _ = run(params, tokens, cfg, segment_ids_bt=segments)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 4 * 2**-8 * np.abs(want).max()


def test_blockwise_in_bfloat16_is_as_close_to_float32_as_the_reference():
    """bf16 inputs (MLA-like head dims, grouped heads, sinks, packed rows): blockwise in bf16 and
    the reference in bf16 each within a few bf16 roundings of the float32 reference, output and
    gradients. (Whole bf16 models are not compared: any rounding difference may flip a router's
    choice, and with it a token's logits.)"""
    q, keys, values, sinks = (x.astype(jnp.bfloat16) for x in _inputs(t=20, s=20, seed=3))
    segments = jnp.asarray([[1] * 8 + [2] * 12, [3] * 17 + [0] * 3])
    mask = attention_mask(segments, segments, 0)
    cotangent = jnp.asarray(np.random.default_rng(4).normal(size=(2, 20, 4, 8)), jnp.float32)

    def run(attention, dtype):  # the output and the gradients of q, k, v
        def out(*args):
            return attention(*(a.astype(dtype) for a in args), mask, 0.3, sinks.astype(dtype))

        y, pullback = jax.vjp(out, q, keys, values)
        return y, pullback(cotangent.astype(dtype))

    blockwise = lambda *a: blockwise_attention(*a, q_block=8, k_block=6)  # noqa: E731
    want = jax.tree.leaves(run(_reference, jnp.float32))
    for got in (run(_reference, jnp.bfloat16), run(blockwise, jnp.bfloat16)):
        for w, g in zip(want, jax.tree.leaves(got)):
            w, g = np.asarray(w, np.float32), np.asarray(g, np.float32)
            assert np.abs(g - w).max() <= 4 * 2**-8 * np.abs(w).max()

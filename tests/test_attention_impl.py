"""attention_impl="dot_product" (jax.nn.dot_product_attention) against the reference attention, for
every family's attention options: MLA with q/k and v head dims apart, grouped-query heads, biases,
QK norms, clamping, partial rotary, sliding windows, sinks; packed and padded rows. Through the KV
cache: tests/test_families.py::test_cache_equals_full_forward."""

import family_configs as fc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_float32_close, model_roundings

from esft_jax.model import forward
from esft_jax.model.attention import dot_product_attention, softmax_attention
from esft_jax.model.loss import next_token_loss


def _loss(params, tokens, segments, cfg):
    logits, _ = forward(params, tokens, cfg, segment_ids_bt=segments)
    batch = {"tokens": tokens, "segment_ids": segments, "loss_mask": segments}
    return next_token_loss(logits, batch)[0], logits


_value_and_grad = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=3)


@pytest.mark.parametrize("family", fc.FAMILIES)
def test_dot_product_equals_reference(family):
    ref_cfg = fc.config(family, moe_strategy="dense")
    assert ref_cfg.attention_impl == "reference"
    params, (tokens, segments) = fc.params(ref_cfg), fc.batch(ref_cfg)
    (_, want_logits), want = _value_and_grad(params, tokens, segments, ref_cfg)
    cfg = ref_cfg.replace(attention_impl="dot_product")
    (_, logits), grads = _value_and_grad(params, tokens, segments, cfg)
    n = model_roundings(cfg)
    assert_float32_close(logits, want_logits, n)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
        assert_float32_close(g, w, 4 * n, err_msg=jax.tree_util.keystr(path))


def test_fully_masked_rows_match_with_and_without_sinks():
    """A query row with no key to attend to (padding): the reference's uniform row without sinks,
    all mass on the sink (output 0) with them; both paths alike, and finite."""
    rng = np.random.default_rng(0)
    b, t, h, g, k, v = 2, 5, 4, 2, 12, 8
    q = jnp.asarray(rng.normal(size=(b, t, h, k)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, t, g, k)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(b, t, g, v)), jnp.float32)
    mask = jnp.asarray(rng.random((b, 1, t, t)) < 0.6).at[0, 0, 2].set(False)
    sinks = jnp.asarray(rng.normal(size=h), jnp.float32)
    for s in (None, sinks):
        scores = jnp.einsum("bthk,bshk->bhts", q, jnp.repeat(keys, h // g, axis=2)) * 0.3
        want = softmax_attention(scores, mask, jnp.repeat(values, h // g, axis=2), s)
        got = dot_product_attention(q, keys, values, mask, 0.3, s)
        assert np.all(np.isfinite(got))
        assert_float32_close(got, want, 8 * np.sqrt(t))


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_dot_product_in_bfloat16_matches_the_reference_in_bfloat16(family):
    """In bf16 (jax.nn.dot_product_attention wants q, k, v of one dtype; MLA's rotated half is
    concatenated to the rest), the two paths agree to bf16 rounding."""
    ref_cfg = fc.config(family, moe_strategy="dense", dtype="bfloat16")
    params, (tokens, segments) = fc.params(ref_cfg), fc.batch(ref_cfg)
    run = jax.jit(forward, static_argnums=2)
    want, _ = run(params, tokens, ref_cfg, segment_ids_bt=segments)
    got, _ = run(
        params, tokens, ref_cfg.replace(attention_impl="dot_product"), segment_ids_bt=segments
    )
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 4 * 2**-8 * np.abs(want).max()

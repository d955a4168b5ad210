"""Properties of the forward pass: packing, padding, precision, differentiability, RoPE, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_float32_close, model_roundings

from esft_jax.checkpoint.hf_names import config_from_hf
from esft_jax.model import (
    ModelConfig,
    forward,
    forward_cached,
    init_cache,
    init_params,
    segment_positions,
)
from esft_jax.model.mask import attention_mask, dense
from esft_jax.model.rope import inv_freq_and_attention_factor, softmax_scale

_forward = jax.jit(forward, static_argnums=2, static_argnames="return_router_scores")


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(q_lora_rank=24, n_routed_experts=16, moe_strategy="capacity")
    params = init_params(cfg, jax.random.key(1))
    params["moe_layers"]["moe"]["router"] *= 15
    return cfg, params


def test_packed_documents_do_not_see_each_other(model):
    cfg, params = model
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, cfg.vocab_size, 10), rng.integers(0, cfg.vocab_size, 14)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    segments = jnp.asarray(np.array([[1] * 10 + [2] * 14]))
    np.testing.assert_array_equal(segment_positions(segments)[0], list(range(10)) + list(range(14)))
    logits, routing = _forward(params, packed, cfg, segment_ids_bt=segments)
    for doc, sl in ((a, slice(0, 10)), (b, slice(10, 24))):
        alone, alone_routing = _forward(params, jnp.asarray(doc[None]), cfg)
        assert_float32_close(logits[0, sl], alone[0], model_roundings(cfg))
        np.testing.assert_array_equal(routing.expert_ids[:, 0, sl], alone_routing.expert_ids[:, 0])


def test_padding_does_not_change_real_tokens(model):
    cfg, params = model
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 16)))
    segments = jnp.asarray([[1] * 9 + [0] * 7])
    logits, _ = _forward(params, tokens, cfg, segment_ids_bt=segments)
    short, _ = _forward(params, tokens[:, :9], cfg)
    assert np.all(np.isfinite(logits))
    assert_float32_close(logits[0, :9], short[0], model_roundings(cfg))


def test_bfloat16_compute_stays_close_and_router_stays_float32(model):
    cfg, params = model
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 16)))
    ref, ref_routing = _forward(params, tokens, cfg, return_router_scores=True)
    bf16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree.map(
        lambda p: p.astype(jnp.bfloat16) if p.dtype == jnp.float32 and p.ndim > 2 else p, params
    )
    logits, routing = _forward(params16, tokens, bf16, return_router_scores=True)
    assert routing.router_scores.dtype == jnp.float32 and routing.gate_weights.dtype == jnp.float32
    assert logits.dtype == jnp.float32
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()
    assert np.mean(np.asarray(routing.expert_ids) == np.asarray(ref_routing.expert_ids)) > 0.9


def test_gradients_flow_to_experts_router_and_attention(model):
    cfg, params = model
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 12)))

    def loss(p):
        logits, _ = forward(p, tokens, cfg)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)), path
    moe = grads["moe_layers"]["moe"]
    assert np.abs(moe["router"]).max() > 0 and np.abs(moe["experts"]["gate"]).max() > 0
    assert np.abs(grads["dense_layers"]["attn"]["kv_b"]).max() > 0


def test_layer_loop_equals_layer_scan(model):
    """scan_layers=False (a Python loop over the stacked layers): same logits, routing, gradients, cache."""
    cfg, params = model
    loop = cfg.replace(scan_layers=False, num_hidden_layers=4)
    params = init_params(loop, jax.random.key(2))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 12)))

    def run(c):
        loss = lambda p: jnp.sum(forward(p, tokens, c)[0] ** 2)  # noqa: E731
        logits, routing = _forward(params, tokens, c)
        cached, cache = jax.jit(forward_cached, static_argnums=2)(
            params,
            tokens,
            c,
            init_cache(c, 2, 16),
            segment_ids_bt=jnp.ones_like(tokens),
            positions_bt=segment_positions(jnp.ones_like(tokens)),
        )
        return logits, routing.expert_ids, jax.jit(jax.grad(loss))(params), cached, cache.kv

    got, want = run(loop), run(loop.replace(scan_layers=True))
    np.testing.assert_array_equal(got[1], want[1])  # the same experts chosen
    for g, w in zip(
        jax.tree.leaves(got), jax.tree.leaves(want)
    ):  # the backward pass doubles the depth
        assert_float32_close(g, w, 2 * model_roundings(loop))


@pytest.mark.parametrize("offset,window", [(0, 0), (0, 3), (5, 0), (5, 4)])
def test_attention_mask_equals_a_loop_over_positions(offset, window):
    """Queries at positions offset .. offset + T - 1 of a row of S keys: query i sees key j iff
    j <= its position, both in one segment, key not padding, and (window > 0) the position fewer
    than `window` behind."""
    keys = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3, 3, 0]])
    queries = keys[:, offset : offset + 3]
    want = np.zeros((2, 1, 3, 10), bool)
    for b, i, j in np.ndindex(2, 3, 10):
        position = offset + i
        want[b, 0, i, j] = (
            j <= position
            and queries[b, i] == keys[b, j] != 0
            and (window == 0 or position - j < window)
        )
    mask = attention_mask(jnp.asarray(queries), jnp.asarray(keys), jnp.int32(offset), window)
    got = dense(mask)
    np.testing.assert_array_equal(got, want)


def test_yarn_matches_transformers_rope_init():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    }
    hf = transformers.DeepseekV2Config(
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        rope_parameters=dict(rope),
        max_position_embeddings=163840,
        num_experts_per_tok=6,
    )
    ref_inv_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    cfg = config_from_hf(hf.to_dict())
    inv_freq, factor = inv_freq_and_attention_factor(cfg)
    np.testing.assert_allclose(inv_freq, ref_inv_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(ref_factor)
    # DeepSeek-V2-Lite: mscale = 0.1 * 0.707 * ln(40) + 1, squared into the softmax scale.
    assert softmax_scale(cfg) == pytest.approx(192**-0.5 * (0.1 * 0.707 * np.log(40) + 1) ** 2)

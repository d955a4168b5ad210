"""Generation with the compressed KV cache equals generation by recomputing the whole sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_float32_close, model_roundings

from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.eval.generate import generate, generate_text
from esft_jax.model import (
    ModelConfig,
    forward,
    forward_cached,
    init_cache,
    init_params,
    segment_positions,
)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(
        vocab_size=260,
        q_lora_rank=24,
        n_routed_experts=16,
        bos_token_id=256,
        eos_token_id=257,
        rope_type="yarn",
        rope_factor=4.0,
        rope_original_max_position_embeddings=16,
        rope_mscale=0.707,
        rope_mscale_all_dim=0.707,
    )
    params = init_params(cfg, jax.random.key(3))
    params["moe_layers"]["moe"]["router"] *= 15
    params["lm_head"] *= 20  # confident greedy choices (no near-ties between the two paths)
    return cfg, params


def _recompute(params, cfg, prompt, n, eos):
    """Greedy decoding by running the full forward pass on the whole sequence at every step (the
    sequence right-padded to a fixed width with segment 0, which causal attention never sees)."""
    run = jax.jit(forward, static_argnums=2)
    width = len(prompt) + n
    seq = list(prompt)
    out = []
    for _ in range(n):
        tokens, segments = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
        tokens[0, : len(seq)], segments[0, : len(seq)] = seq, 1
        logits, _ = run(params, jnp.asarray(tokens), cfg, segment_ids_bt=jnp.asarray(segments))
        token = int(jnp.argmax(logits[0, len(seq) - 1]))
        if token == eos:
            break
        out.append(token)
        seq.append(token)
    return out


def test_cached_logits_equal_full_forward(model):
    cfg, params = model
    tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
    full, _ = forward(params, jnp.asarray(tokens), cfg)
    segments = jnp.ones((2, 12), jnp.int32)
    positions = segment_positions(segments)
    cache = init_cache(cfg, 2, 16)
    prefix, cache = forward_cached(
        params,
        jnp.asarray(tokens[:, :7]),
        cfg,
        cache,
        segment_ids_bt=segments[:, :7],
        positions_bt=positions[:, :7],
    )
    steps = [prefix]
    for t in range(7, 12):
        logits, cache = forward_cached(
            params,
            jnp.asarray(tokens[:, t : t + 1]),
            cfg,
            cache,
            segment_ids_bt=segments[:, t : t + 1],
            positions_bt=positions[:, t : t + 1],
        )
        steps.append(logits)
    assert cache.length.tolist() == [12, 12] and cache.kv["moe_layers"][0].shape == (
        2,
        2,
        16,
        cfg.kv_lora_rank,
    )
    assert_float32_close(np.concatenate(steps, axis=1), full, model_roundings(cfg))


def test_batched_cached_generation_equals_recomputation(model):
    cfg, params = model
    rng = np.random.default_rng(1)
    prompts = [
        rng.integers(0, 256, n).tolist() for n in (5, 11, 3)
    ]  # different lengths: left padding
    got = generate(params, cfg, prompts, max_new_tokens=12, eos_id=cfg.eos_token_id, bucket=8)
    for prompt, tokens in zip(prompts, got):
        assert tokens == _recompute(params, cfg, prompt, 12, cfg.eos_token_id)
    assert max(len(t) for t in got) > 3


def test_generate_text_stops(model):
    cfg, params = model
    tok = byte_tokenizer()
    full = generate_text(params, cfg, tok, ["abc", "hello"], max_new_tokens=10)
    assert len(full) == 2
    stop = full[0][2:4]
    if stop:
        cut = generate_text(params, cfg, tok, ["abc"], max_new_tokens=10, stop=[stop])
        assert cut[0] == full[0][: full[0].index(stop)]


def test_generation_on_the_mesh_equals_one_device(model):
    from esft_jax import sharding
    from esft_jax.model import param_axes

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg, params = model
    prompts = [np.random.default_rng(i).integers(0, 256, 4 + i).tolist() for i in range(4)]
    ref = generate(params, cfg, prompts, max_new_tokens=6, eos_id=cfg.eos_token_id, bucket=8)
    mesh = sharding.make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
    with jax.set_mesh(mesh):
        got = generate(
            sharding.shard_params(params, param_axes(cfg), mesh),
            cfg,
            prompts,
            max_new_tokens=6,
            eos_id=cfg.eos_token_id,
            bucket=8,
        )
    assert got == ref


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_a_decoding_step_writes_the_cache_in_place(attention):
    """The cache is carried through the layer loop and written where it is: a decoding step with
    the cache donated needs no second copy of it (passing each layer's cache through the scan as
    input and output did: a whole new stack). Read from the compiled step's memory."""
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        attention=attention,
        num_key_value_heads=2,
        head_dim=16,
        kv_lora_rank=32,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=8192,
    )
    cache = jax.eval_shape(lambda: init_cache(cfg, 8, 8192))
    ones = jnp.ones((8, 1), jnp.int32)

    def step(params, tokens, cache):
        return forward_cached(
            params, tokens, cfg, cache, segment_ids_bt=ones, positions_bt=cache.length[:, None]
        )

    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    mem = (
        jax.jit(step, donate_argnums=2)
        .lower(params, jax.ShapeDtypeStruct((8, 1), jnp.int32), cache)
        .compile()
        .memory_analysis()
    )
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache.kv))
    beyond = mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    assert beyond < 0.5 * cache_bytes, (beyond, cache_bytes)

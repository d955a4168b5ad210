"""The chunked next-token loss equals the loss of the full logits, value and gradients (packed and
padded rows, answer masks, tied embeddings, a chunk that does not divide the rows), and its compiled
gradient holds no [tokens, vocab] float32 array."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from numerics import assert_float32_close, model_roundings

from esft_jax import sharding
from esft_jax.model import ModelConfig, forward, init_params, lm_head, param_axes
from esft_jax.model.loss import chunked_next_token_loss, next_token_loss


def _batch(vocab: int, b: int = 3, t: int = 13) -> dict[str, jax.Array]:
    """Row 0 one document, row 1 right-padded, row 2 two packed documents; answers masked in part."""
    rng = np.random.default_rng(0)
    segments = np.ones((b, t), np.int32)
    segments[1, t - 4 :] = 0
    segments[2, t // 2 :] = 2
    loss_mask = (rng.random((b, t)) < 0.7).astype(np.int32)
    tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
    return {
        k: jnp.asarray(v)
        for k, v in dict(tokens=tokens, segment_ids=segments, loss_mask=loss_mask).items()
    }


def _full(params, batch, cfg):
    logits, _ = forward(params, batch["tokens"], cfg, segment_ids_bt=batch["segment_ids"])
    return next_token_loss(logits, batch)


def _chunked(params, batch, cfg, chunk_tokens):
    hidden, _ = forward(
        params, batch["tokens"], cfg, segment_ids_bt=batch["segment_ids"], return_hidden=True
    )
    return chunked_next_token_loss(hidden, lm_head(params, cfg), batch, chunk_tokens)


_full_grad = jax.jit(jax.value_and_grad(lambda *a: _full(*a)[0]), static_argnums=2)
_chunked_grad = jax.jit(jax.value_and_grad(lambda *a: _chunked(*a)[0]), static_argnums=(2, 3))


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_and_gradients_equal_the_full_loss(tied):
    cfg = ModelConfig(tie_word_embeddings=tied, num_hidden_layers=2, moe_strategy="dense")
    params, batch = init_params(cfg, jax.random.key(0)), _batch(cfg.vocab_size)
    want, want_grads = _full_grad(params, batch, cfg)
    n = 4 * model_roundings(cfg)
    # 3 rows: 12 tokens -> 4 positions a chunk (13 = 4 x 3 + 1: padded), 39 -> one chunk, 3 -> 1 each
    for chunk_tokens in (12, 39, 3):
        got, grads = _chunked_grad(params, batch, cfg, chunk_tokens)
        assert_float32_close(got, want, n, err_msg=f"chunk {chunk_tokens}")
        assert _chunked(params, batch, cfg, chunk_tokens)[1] == _full(params, batch, cfg)[1]
        for (path, g), w in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)
        ):
            assert_float32_close(
                g, w, n, err_msg=f"chunk {chunk_tokens} {jax.tree_util.keystr(path)}"
            )


def _f32_buffers(hlo: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", hlo)]


def test_no_tokens_by_vocab_float32_array_forward_or_backward():
    b, t, d, v = 2, 256, 16, 1000
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    batch = {
        "tokens": jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "loss_mask": jnp.ones((b, t), jnp.int32),
    }

    def compiled(loss):
        return (
            jax.jit(jax.grad(lambda h, w: loss(h, w)[0], argnums=(0, 1)))
            .lower(hidden, head)
            .compile()
        )

    full = compiled(lambda h, w: next_token_loss(jnp.einsum("btd,dv->btv", h, w), batch))
    chunked = compiled(lambda h, w: chunked_next_token_loss(h, w, batch, chunk_tokens=32))
    logits_bytes = b * t * v * 4

    def largest_with_vocab(c) -> int:
        return max((int(np.prod(s)) for s in _f32_buffers(c.as_text()) if v in s), default=0)

    # the check sees the full loss's logits, and the chunked loss has only chunk-sized ones
    assert largest_with_vocab(full) >= b * t * v
    assert largest_with_vocab(chunked) <= 32 * v
    assert full.memory_analysis().temp_size_in_bytes >= logits_bytes
    assert chunked.memory_analysis().temp_size_in_bytes < logits_bytes / 4


def test_split_over_rows_and_vocabulary_equals_one_device():
    """fsdp 2 x tensor 4: the rows split over fsdp, the output projection's vocabulary over tensor."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg = ModelConfig(num_hidden_layers=2, moe_strategy="dense")
    params, batch = init_params(cfg, jax.random.key(0)), _batch(cfg.vocab_size, b=4)
    want, want_grads = _chunked_grad(params, batch, cfg, 12)
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4}, jax.devices()[:8])
    rows = NamedSharding(mesh, sharding.logical_to_spec(("act_batch", None), dict(mesh.shape)))
    with jax.set_mesh(mesh):
        got, grads = _chunked_grad(
            sharding.shard_params(params, param_axes(cfg), mesh),
            jax.tree.map(lambda a: jax.device_put(a, rows), batch),
            cfg,
            12,
        )
    n = 4 * model_roundings(cfg)
    assert_float32_close(got, want, n)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert_float32_close(g, w, n)

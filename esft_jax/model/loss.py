"""Next-token cross-entropy over the answer tokens of packed rows (`batch_loss`: the model's, as
training and perplexity compute it), and the load-balance loss.

`chunked_next_token_loss` is `next_token_loss` computed from the final hidden states without ever
holding [tokens, vocab] float32 logits, forward or backward: position chunks of every row go
through the output projection, log-softmax and NLL one at a time, and under differentiation each
chunk's gradients (w.r.t. the hidden states and, where it is trained, the projection) are formed
right there, while its logits exist, so the backward pass only scales them (no recomputed logits,
no second pass over the vocabulary). At batch 8 x 4096 on a 102400-token vocabulary that is
1024-token chunks of 0.4 GiB instead of 12.5 GiB logits (and their gradient).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from esft_jax.model.config import ModelConfig
from esft_jax.model.transformer import Routing, forward, lm_head
from esft_jax.sharding import constrain

# Tokens per chunk (rows x positions). A [1024, d] x [d, V] matmul keeps an accelerator busy, and
# its float32 logits stay small: 0.4 GiB at DeepSeek's V = 102400, 0.8 GiB at gpt-oss's 201088
# (about 3 chunk-sized buffers are alive at once); smaller chunks only add loop steps.
LOSS_CHUNK_TOKENS = 1024


def next_token_targets(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(targets [B, T]: token t+1 for position t, valid [B, T] bool). Position t counts when t and
    t+1 lie in the same (non-padding) segment and token t+1 is an answer token; the last never."""
    seg, tokens = batch["segment_ids"], batch["tokens"]
    valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0) & (batch["loss_mask"][:, 1:] != 0)
    last = jnp.zeros_like(valid[:, :1])
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    return targets, jnp.concatenate([valid, last], axis=1)


def next_token_loss(
    logits_btv: jax.Array, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """(sum of losses, number of predicted tokens) from full logits [B, T, V] (next_token_targets)."""
    targets, valid = (a[:, :-1] for a in next_token_targets(batch))
    logp = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def chunked_next_token_loss(
    hidden_btd: jax.Array,
    head_dv: jax.Array,
    batch: dict[str, jax.Array],
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> tuple[jax.Array, jax.Array]:
    """next_token_loss of the logits hidden [B, T, d] @ head [d, V] (float32 accumulation, as the
    model's own logits), in chunks of B rows x max(1, chunk_tokens // B) positions: the rows stay
    whole, so a batch split over devices stays split. T is padded up to whole chunks."""
    targets_bt, valid_bt = next_token_targets(batch)
    b, t, _ = hidden_btd.shape
    c = min(t, max(1, chunk_tokens // b))
    pad = [(0, 0), (0, -t % c)]
    weight_bt = jnp.pad(valid_bt.astype(jnp.float32), pad)
    hidden_btd = jnp.pad(hidden_btd, pad + [(0, 0)])
    return _nll_sum(hidden_btd, head_dv, jnp.pad(targets_bt, pad), weight_bt, c), jnp.sum(valid_bt)


def batch_loss(
    params: dict[str, Any],
    batch: dict[str, jax.Array],
    cfg: ModelConfig,
    *,
    return_router_scores: bool = False,
) -> tuple[jax.Array, jax.Array, Routing]:
    """(sum of losses, number of predicted tokens, Routing) of the model on a packed batch
    (tokens, segment_ids, positions, loss_mask [B, T]), through chunked_next_token_loss."""
    x, routing = forward(
        params,
        batch["tokens"],
        cfg,
        segment_ids_bt=batch["segment_ids"],
        positions_bt=batch["positions"],
        return_router_scores=return_router_scores,
        return_hidden=True,
    )
    return *chunked_next_token_loss(x, lm_head(params, cfg), batch), routing


def _chunks(
    h_btd: jax.Array,
    head_dv: jax.Array,
    targets_bt: jax.Array,
    weight_bt: jax.Array,
    c: int,
    grads: tuple[bool, bool] = (False, False),
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Over the T / c position chunks: (sum of weight * NLL, its gradient w.r.t. h [B, T, d] if
    grads[0], w.r.t. head [d, V] if grads[1]; summed in float32, returned in the inputs' dtypes).
    One chunk's logits [B, c, V] exist at a time."""
    b, t, d = h_btd.shape
    v = head_dv.shape[1]
    d_h = jnp.zeros((b, t, d), jnp.float32) if grads[0] else None
    d_head = jnp.zeros((d, v), jnp.float32) if grads[1] else None

    def chunk(carry, i):
        loss, d_h, d_head = carry
        h, target, w = (
            jax.lax.dynamic_slice_in_dim(a, i * c, c, axis=1)
            for a in (h_btd, targets_bt, weight_bt)
        )
        logits = jnp.einsum("bcd,dv->bcv", h, head_dv, preferred_element_type=jnp.float32)
        logits = constrain(logits, ("act_batch", None, "act_vocab"))
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        loss = loss + jnp.sum(w * (lse - picked))
        if grads != (False, False):  # d NLL / d logits = softmax - one_hot(target)
            probs = jnp.exp(logits - lse[..., None])
            hit = jnp.arange(v) == target[..., None]
            d_logits = (jnp.where(hit, probs - 1.0, probs) * w[..., None]).astype(head_dv.dtype)
        if grads[0]:
            d_hc = jnp.einsum("bcv,dv->bcd", d_logits, head_dv, preferred_element_type=jnp.float32)
            d_h = jax.lax.dynamic_update_slice_in_dim(d_h, d_hc, i * c, axis=1)
        if grads[1]:
            d_head = d_head + jnp.einsum(
                "bcd,bcv->dv", h, d_logits, preferred_element_type=jnp.float32
            )
        return (loss, d_h, d_head), None

    zero = (jnp.zeros((), jnp.float32), d_h, d_head)
    loss, d_h, d_head = jax.lax.scan(chunk, zero, jnp.arange(t // c))[0]
    cast = lambda d, x: None if d is None else d.astype(x.dtype)  # noqa: E731
    return loss, cast(d_h, h_btd), cast(d_head, head_dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nll_sum(h_btd, head_dv, targets_bt, weight_bt, c):
    return _chunks(h_btd, head_dv, targets_bt, weight_bt, c)[0]


def _nll_sum_fwd(h_btd, head_dv, targets_bt, weight_bt, c):
    """The loss and its gradients in one pass; only the inputs being differentiated get one (ESFT's
    frozen lm_head: no [d, V] gradient)."""
    grads = (h_btd.perturbed, head_dv.perturbed)
    args = (h_btd.value, head_dv.value, targets_bt.value, weight_bt.value)
    loss, d_h, d_head = _chunks(*args, c, grads)
    return loss, (d_h, d_head)


def _nll_sum_bwd(c, residuals, g):
    d_h, d_head = ((None if d is None else (g * d).astype(d.dtype)) for d in residuals)
    return d_h, d_head, None, None  # no gradient for the targets and weights


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd, symbolic_zeros=True)


def load_balance_loss(
    expert_ids_lbtk: jax.Array, router_scores_lbte: jax.Array, mask_bt: jax.Array
) -> jax.Array:
    """Switch-style auxiliary loss, averaged over layers: E * sum_e f_e * P_e, where f_e is the share
    of top-k assignments to expert e and P_e its mean router score over the masked tokens (1 when
    routing is uniform). Used in pretraining to keep experts in use."""
    e = router_scores_lbte.shape[-1]
    m = mask_bt.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    f = jnp.einsum("lbtke,bt->le", jax.nn.one_hot(expert_ids_lbtk, e, dtype=jnp.float32), m)
    f = f / (n * expert_ids_lbtk.shape[-1])
    p = jnp.einsum("lbte,bt->le", router_scores_lbte, m) / n
    return jnp.mean(e * jnp.sum(f * p, axis=-1))

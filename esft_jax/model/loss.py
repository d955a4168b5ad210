"""Next-token cross-entropy over the answer tokens of packed rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(
    logits_btv: jax.Array, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """(sum of losses, number of predicted tokens). Position t predicts token t+1 when both lie in
    the same (non-padding) segment and token t+1 is an answer token."""
    seg = batch["segment_ids"]
    valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0) & (batch["loss_mask"][:, 1:] != 0)
    logp = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


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

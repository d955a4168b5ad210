"""Next-token cross-entropy over the answer tokens of packed rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits_btv: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of losses, number of predicted tokens). Position t predicts token t+1 when both lie in
    the same (non-padding) segment and token t+1 is an answer token."""
    seg = batch["segment_ids"]
    valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0) & (batch["loss_mask"][:, 1:] != 0)
    logp = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)

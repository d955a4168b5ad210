"""Which keys each query attends to, described rather than materialised.

A query sees a key iff the key's position is not after the query's (causal), both lie in one
segment (packed documents), the key is not padding (segment id 0) and, with a sliding window, the
key is fewer than `window` positions behind. Positions count along the row, or along the KV cache:
there row b's queries sit at positions offset_b .. offset_b + T - 1 of S (not their rotary
positions, which restart at every segment). `dense` materialises [B, 1, T, S] for the paths that
take a boolean mask; blockwise attention (model/blockwise_attention.py) evaluates `visible` one
block of queries x keys at a time, so no [T, S] array exists.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# The score of a key a query does not see: finite, so that a row seeing no key at all (padding)
# gets a uniform softmax row, as the reference computes it, not NaN.
MASKED = -1e30


class AttentionMask(NamedTuple):
    """The visibility of S keys (positions 0 .. S - 1) to T queries, per row."""

    query_segments_bt: jax.Array  # [B, T] int: 0 marks padding
    query_positions_bt: jax.Array  # [B, T] int32: each query's position
    key_segments_bs: jax.Array  # [B, S] int: 0 marks padding and unfilled cache positions
    window: jax.Array  # [] int32: see only keys fewer than this many positions behind; 0: no limit


def attention_mask(
    query_segments_bt: jax.Array,
    key_segments_bs: jax.Array,
    query_offset: jax.Array | int,
    window: jax.Array | int = 0,
) -> AttentionMask:
    """Without a cache the keys are the queries themselves (S = T, offset 0). With a KV cache they
    are its S positions and row b's queries start at the offset, a scalar or one per row [B]
    (continuous batching: every row at its own length). A window may be traced (one per layer of a
    layer scan)."""
    t = query_segments_bt.shape[1]
    offset_b1 = jnp.reshape(jnp.asarray(query_offset, jnp.int32), (-1, 1))
    positions_bt = jnp.broadcast_to(
        offset_b1 + jnp.arange(t, dtype=jnp.int32), query_segments_bt.shape
    )
    return AttentionMask(
        query_segments_bt, positions_bt, key_segments_bs, jnp.asarray(window, jnp.int32)
    )


def visible(
    query_segments_bt: jax.Array,
    query_positions_bt: jax.Array,
    key_segments_bs: jax.Array,
    key_positions_s: jax.Array,
    window: jax.Array,
) -> jax.Array:
    """[B, T, S] bool for any T queries and S keys of the rows (a block of each, or all)."""
    behind_bts = query_positions_bt[:, :, None] - key_positions_s[None, None, :]
    limit = jnp.where(window > 0, window, jnp.iinfo(jnp.int32).max)
    same = query_segments_bt[:, :, None] == key_segments_bs[:, None, :]
    return (behind_bts >= 0) & (behind_bts < limit) & same & (key_segments_bs != 0)[:, None, :]


def dense(mask: AttentionMask) -> jax.Array:
    """The mask materialised: [B, 1, T, S] bool."""
    s = mask.key_segments_bs.shape[1]
    positions_s = jnp.arange(s, dtype=jnp.int32)
    return visible(
        mask.query_segments_bt,
        mask.query_positions_bt,
        mask.key_segments_bs,
        positions_s,
        mask.window,
    )[:, None]

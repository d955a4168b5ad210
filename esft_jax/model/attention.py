"""The attention core both attention kinds (model/mla.py, model/gqa.py) share: softmax(q k^T) v
over the keys each query sees (model/mask.py), three ways, chosen by `cfg.attention_impl`:

- "reference": `softmax_attention`, the float32 scores [B, H, T, S] materialised; the definition
  the others are tested against, and what XLA runs fastest on a CPU at short lengths.
- "dot_product": `dot_product_attention`, jax.nn.dot_product_attention with JAX's choice of kernel.
- "blockwise": model/blockwise_attention.py, exact attention in blocks that never holds the scores,
  forward or backward: the memory of long sequences (and the KV cache's decoding alike).

Also the KV cache's writes (`LayerCache`), in place into the stacked cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from esft_jax.model.blockwise_attention import blockwise_attention
from esft_jax.model.config import ModelConfig
from esft_jax.model.mask import MASKED, AttentionMask, dense


def write_rows(cached_bs: jax.Array, new_bt: jax.Array, offset_b: jax.Array) -> jax.Array:
    """cached [B, S, ...] with row b's new [T, ...] written at positions offset_b[b] .. + T - 1."""

    def write(cached, new, offset):
        return jax.lax.dynamic_update_slice_in_dim(cached, new.astype(cached.dtype), offset, 0)

    return jax.vmap(write)(cached_bs, new_bt, offset_b)


class LayerCache(NamedTuple):
    """One layer's place in its group's stacked KV cache: the attention kind's two cached arrays
    [L, B, S, ...] whole, this layer's index and each row's write offset [B]. The stacks ride
    through the layer loop as its carry, so the new tokens are scattered into them in place: no
    layer's cache is copied out and back (as a scan's inputs and outputs would)."""

    a_lbs: jax.Array
    b_lbs: jax.Array
    layer: jax.Array  # int32 scalar
    offset_b: jax.Array

    def write(self, new_a_bt: jax.Array, new_b_bt: jax.Array) -> LayerCache:
        """Row b's new entries [T, ...] written at this layer's positions offset_b[b] .. + T - 1."""
        return self._replace(
            a_lbs=self._write(self.a_lbs, new_a_bt), b_lbs=self._write(self.b_lbs, new_b_bt)
        )

    def read(self) -> tuple[jax.Array, jax.Array]:
        """This layer's two arrays [B, S, ...]."""
        return self.a_lbs[self.layer], self.b_lbs[self.layer]

    def _write(self, stack_lbs: jax.Array, new_bt: jax.Array) -> jax.Array:
        # this layer's slice written and put back whole: one layer's copy at a time (a scatter into
        # the stack is widened to float32, the whole stack, by XLA:CPU)
        layer_bs = write_rows(stack_lbs[self.layer], new_bt, self.offset_b)
        return jax.lax.dynamic_update_index_in_dim(stack_lbs, layer_bs, self.layer, 0)


def attend(
    q_bthk: jax.Array,
    k_bsgk: jax.Array,
    v_bsgv: jax.Array,
    mask: AttentionMask,
    scale: float,
    cfg: ModelConfig,
    sinks_h: jax.Array | None = None,
) -> jax.Array:
    """softmax(q k^T * scale over the visible keys [, sink]) @ v -> [B, T, H, v], by
    cfg.attention_impl. The G key/value heads (G divides H) each serve H / G consecutive query
    heads; v's head dim may differ from q's and k's."""
    if cfg.attention_impl == "blockwise":
        block = cfg.attention_block
        return blockwise_attention(q_bthk, k_bsgk, v_bsgv, mask, scale, sinks_h, block, block)
    if cfg.attention_impl == "dot_product":
        return dot_product_attention(q_bthk, k_bsgk, v_bsgv, dense(mask), scale, sinks_h)
    repeat = q_bthk.shape[2] // k_bsgk.shape[2]  # every query head's own copy of its key/value head
    k_bshk, v_bshv = jnp.repeat(k_bsgk, repeat, axis=2), jnp.repeat(v_bsgv, repeat, axis=2)
    scores = jnp.einsum("bthk,bshk->bhts", q_bthk, k_bshk, preferred_element_type=jnp.float32)
    return softmax_attention(scores * scale, dense(mask), v_bshv, sinks_h)


def softmax_attention(
    scores_bhts: jax.Array,
    mask_b1ts: jax.Array,
    v_bshv: jax.Array,
    sinks_h: jax.Array | None = None,
) -> jax.Array:
    """softmax(scores) @ v over the unmasked keys -> [B, T, H, v]. scores are float32 and already scaled.

    Sinks (gpt-oss): a per-head logit that joins every row's softmax and takes its share of the
    probability mass, but contributes no value. A row with no unmasked key is uniform (MASKED is
    finite): the mean of all S values, 0 with sinks.
    """
    scores = jnp.where(mask_b1ts, scores_bhts, MASKED)
    if sinks_h is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        sink = jnp.broadcast_to(
            sinks_h.astype(jnp.float32)[None, :, None, None], (*scores.shape[:-1], 1)
        )
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    return jnp.einsum("bhts,bshv->bthv", probs.astype(v_bshv.dtype), v_bshv)


def dot_product_attention(
    q_bthk: jax.Array,
    k_bsgk: jax.Array,
    v_bsgv: jax.Array,
    mask_b1ts: jax.Array,
    scale: float,
    sinks_h: jax.Array | None = None,
) -> jax.Array:
    """softmax_attention's output [B, T, H, v] through jax.nn.dot_product_attention with JAX's
    choice of kernel (implementation=None). In JAX 0.10 that is XLA's on every backend, which
    materialises the scores too; cuDNN's flash kernel (implementation="cudnn") is not chosen here:
    it takes bf16/fp16 only, head dims up to 256 (Hopper), even lengths with a bias, and turns
    the boolean mask into a [B, 1, T, S] bias.

    The G key/value heads (G divides H) each serve H / G consecutive query heads, as
    softmax_attention's repeated ones, without being repeated. What the function cannot take is
    rewritten exactly: v's head dim differing from q/k's (MLA) -> the narrower side padded with
    zeros (zeros add nothing to a score; the padded output columns are zero and cut off); sinks ->
    one more key position, its key and value zero, never masked, whose logit is the sink (a bias
    [1, H, 1, S + 1]). Masks (segments, causality, cache positions, sliding windows) come in as the
    boolean mask, so a per-layer window may be traced (the layer scan's).
    """
    vd, width = v_bsgv.shape[-1], max(q_bthk.shape[-1], v_bsgv.shape[-1])
    widen = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])  # noqa: E731
    q_bthk, k_bsgk, v_bsgv = widen(q_bthk), widen(k_bsgk), widen(v_bsgv)
    bias = None
    if sinks_h is not None:
        one_more = [(0, 0), (0, 1), (0, 0), (0, 0)]
        k_bsgk, v_bsgv = jnp.pad(k_bsgk, one_more), jnp.pad(v_bsgv, one_more)
        mask_b1ts = jnp.pad(mask_b1ts, [(0, 0)] * 3 + [(0, 1)], constant_values=True)
        s = mask_b1ts.shape[-1]
        bias = jnp.zeros((1, q_bthk.shape[2], 1, s), jnp.float32)
        bias = bias.at[..., -1].set(sinks_h.astype(jnp.float32)[None, :, None])
    out = jax.nn.dot_product_attention(
        q_bthk,
        k_bsgk.astype(q_bthk.dtype),
        v_bsgv.astype(q_bthk.dtype),
        bias=bias,
        mask=mask_b1ts,
        scale=scale,
    )
    return out[..., :vd]

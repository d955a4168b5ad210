"""Blockwise attention (attention_impl="blockwise"): exact softmax attention that never holds the
scores [B, H, T, S], forward or backward, in plain JAX (any backend; the KV cache's decoding too).

Queries are cut into blocks of q_block, keys into blocks of k_block (the last of each padded: a
padded key has segment 0, so no query sees it; padded queries are cut off). Each query block scans
the key blocks with the online softmax of flash attention: a running max m, a running sum z of
exp(score - m) and the running sum of exp(score - m) * v, so one block's scores
[B, q_block, H, k_block] exist at a time. The backward (custom_vjp) recomputes each block's
probabilities exp(score - m) / z from the saved m and z: it holds O(T) per head, not O(T * S).
Visibility is evaluated per block from the mask's description (model/mask.py); a block where no
query sees any key (above the causal diagonal, outside every window) is skipped (lax.cond), so
causal attention computes about half the blocks and a window w about T * w scores.

It computes what softmax_attention (model/attention.py) computes: sinks (gpt-oss) start every row's
running max at the sink's logit and its sum at 1; a row that sees no key (padding) gets the
reference's uniform row, the mean of all S values (0 with sinks). The G key/value heads each serve
H / G consecutive query heads without being repeated; v's head dim may differ from q's and k's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from esft_jax.model.mask import MASKED, AttentionMask, visible

_F32 = jnp.float32


def blockwise_attention(
    q_bthk: jax.Array,
    k_bsgk: jax.Array,
    v_bsgv: jax.Array,
    mask: AttentionMask,
    scale: float,
    sinks_h: jax.Array | None = None,
    q_block: int = 512,
    k_block: int = 512,
) -> jax.Array:
    """softmax(q k^T * scale over the visible keys [, sink]) @ v -> [B, T, H, v] in v's dtype."""
    t, s = q_bthk.shape[1], k_bsgk.shape[1]
    return _attention(
        q_bthk, k_bsgk, v_bsgv, sinks_h, mask, scale, min(q_block, t), min(k_block, s)
    )


def _blocks(x_bn: jax.Array, size: int) -> jax.Array:
    """[B, N, ...] -> [ceil(N / size), B, size, ...], zero-padded (segment 0 for segment ids)."""
    b, n = x_bn.shape[:2]
    count = -(-n // size)
    pad = [(0, 0), (0, count * size - n)] + [(0, 0)] * (x_bn.ndim - 2)
    x = jnp.pad(x_bn, pad).reshape(b, count, size, *x_bn.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unblock(x_nbq: jax.Array, length: int) -> jax.Array:
    """_blocks' inverse: [n, B, size, ...] -> [B, length, ...]."""
    n, b, size = x_nbq.shape[:3]
    return jnp.moveaxis(x_nbq, 0, 1).reshape(b, n * size, *x_nbq.shape[3:])[:, :length]


def _key_blocks(k_bsgk, v_bsgv, mask: AttentionMask, k_block: int):
    """(keys, values, key segments, key positions), each cut into key blocks."""
    s = k_bsgk.shape[1]
    positions_s = jnp.arange(-(-s // k_block) * k_block, dtype=jnp.int32)
    return (
        _blocks(k_bsgk, k_block),
        _blocks(v_bsgv, k_block),
        _blocks(mask.key_segments_bs, k_block),
        positions_s.reshape(-1, k_block),
    )


def _query_blocks(x_bth: jax.Array, groups: int, q_block: int) -> jax.Array:
    """x [B, T, H, ...] of the queries' heads -> [n, B, q_block, G, H / G, ...]."""
    b, t, h = x_bth.shape[:3]
    return _blocks(x_bth.reshape(b, t, groups, h // groups, *x_bth.shape[3:]), q_block)


def _query_positions(mask: AttentionMask, q_block: int) -> tuple[jax.Array, jax.Array]:
    """(query segments, query positions), each [n, B, q_block]."""
    return _blocks(mask.query_segments_bt, q_block), _blocks(mask.query_positions_bt, q_block)


def _dot(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.einsum(spec, x, y, preferred_element_type=_F32)


def _scores(q_bqgrk, k_bsgk, visible_bq11s, scale: float) -> jax.Array:
    """One block's scores [B, q, G, R, s] in float32, MASKED where not visible."""
    s = _dot("bqgrk,bsgk->bqgrs", q_bqgrk, k_bsgk) * scale
    return jnp.where(visible_bq11s, s, MASKED)


def _start(sinks_h: jax.Array | None, shape_bqgr: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The online softmax's running max m and running sum z before any key: the sink's logit and
    exp(0) = 1 with sinks; else MASKED and 0."""
    if sinks_h is None:
        return jnp.full(shape_bqgr, MASKED, _F32), jnp.zeros(shape_bqgr, _F32)
    sinks_gr = sinks_h.astype(_F32).reshape(shape_bqgr[2:])
    return jnp.broadcast_to(sinks_gr, shape_bqgr), jnp.ones(shape_bqgr, _F32)


def _nonzero(z: jax.Array) -> jax.Array:
    """z where a row saw a key (or has a sink), else 1: that row's exp terms are all 0."""
    return jnp.where(z == 0, 1.0, z)


def _tied(mask: AttentionMask, q_bthk: jax.Array) -> tuple[AttentionMask, jax.Array]:
    """The mask made to depend on q for JAX's tracing. Inside a layer scan the mask is the same in
    every layer, and JAX's scan partial evaluation hoists whatever depends only on loop-invariant
    values out of the loop: every block's visibility (and what is derived from it alone) would be
    precomputed for all blocks at once, [n, n, B, q_block, H, k_block], the scores' size."""
    return jax.lax.optimization_barrier((mask, q_bthk))


def _forward(q_bthk, k_bsgk, v_bsgv, sinks_h, mask: AttentionMask, scale, q_block, k_block):
    """(output [B, T, H, v], the final running max m and sum z, each [n, B, q_block, G, R])."""
    mask, q_bthk = _tied(mask, q_bthk)
    b, t, h = q_bthk.shape[:3]
    g, dv = k_bsgk.shape[2], v_bsgv.shape[-1]
    keys = _key_blocks(k_bsgk, v_bsgv, mask, k_block)
    mean_b11gv = jnp.mean(v_bsgv.astype(_F32), axis=1)[:, None, :, None]  # a row seeing nothing

    def query_block(_, query):
        q, q_segments, q_positions = query

        def key_block(carry, key):
            k, v, k_segments, k_positions = key
            seen = visible(q_segments, q_positions, k_segments, k_positions, mask.window)[
                :, :, None, None
            ]

            def update(carry):
                m, z, acc = carry
                scores = _scores(q, k, seen, scale)
                new_m = jnp.maximum(m, scores.max(-1))
                p = jnp.where(seen, jnp.exp(scores - new_m[..., None]), 0.0)
                kept = jnp.exp(m - new_m)
                pv = _dot("bqgrs,bsgv->bqgrv", p.astype(v.dtype), v)
                return new_m, z * kept + p.sum(-1), acc * kept[..., None] + pv

            return jax.lax.cond(jnp.any(seen), update, lambda c: c, carry), None

        m, z = _start(sinks_h, (b, q_block, g, h // g))
        acc = jnp.zeros((*m.shape, dv), _F32)
        (m, z, acc), _ = jax.lax.scan(key_block, (m, z, acc), keys)
        out = jnp.where((z == 0)[..., None], mean_b11gv, acc / _nonzero(z)[..., None])
        return None, (out, m, z)

    queries = (_query_blocks(q_bthk, g, q_block), *_query_positions(mask, q_block))
    _, (out, m, z) = jax.lax.scan(query_block, None, queries)
    return _unblock(out, t).reshape(b, t, h, dv).astype(v_bsgv.dtype), (m, z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q_bthk, k_bsgk, v_bsgv, sinks_h, mask, scale, q_block, k_block):
    return _forward(q_bthk, k_bsgk, v_bsgv, sinks_h, mask, scale, q_block, k_block)[0]


def _attention_fwd(q_bthk, k_bsgk, v_bsgv, sinks_h, mask, scale, q_block, k_block):
    out, (m, z) = _forward(q_bthk, k_bsgk, v_bsgv, sinks_h, mask, scale, q_block, k_block)
    return out, (q_bthk, k_bsgk, v_bsgv, sinks_h, mask, out, m, z)


def _attention_bwd(scale, q_block, k_block, residuals, dout_bthv):
    """Flash attention's backward: per block p = exp(score - m) / z, dv += p^T dout,
    dscore = p * (dout . v - D) with D = rowsum(dout * out), dq += dscore k, dk += dscore^T q."""
    q_bthk, k_bsgk, v_bsgv, sinks_h, mask, out_bthv, m, z = residuals
    t, h, g, s = q_bthk.shape[1], q_bthk.shape[2], k_bsgk.shape[2], k_bsgk.shape[1]
    dt = q_bthk.dtype
    d_bth = jnp.einsum("bthv,bthv->bth", dout_bthv.astype(_F32), out_bthv.astype(_F32))
    dout, d = _query_blocks(dout_bthv.astype(dt), g, q_block), _query_blocks(d_bth, g, q_block)
    keys = _key_blocks(k_bsgk, v_bsgv, mask, k_block)

    def query_block(dkv, query):
        q, q_segments, q_positions, do, m, z, d = query

        def key_block(dq, key):
            k, v, k_segments, k_positions = key
            seen = visible(q_segments, q_positions, k_segments, k_positions, mask.window)[
                :, :, None, None
            ]

            def grads(dq):
                scores = _scores(q, k, seen, scale)
                p = jnp.where(seen, jnp.exp(scores - m[..., None]), 0.0) / _nonzero(z)[..., None]
                dv = _dot("bqgrs,bqgrv->bsgv", p.astype(dt), do)
                ds = (p * (_dot("bqgrv,bsgv->bqgrs", do, v) - d[..., None]) * scale).astype(dt)
                dq = dq + _dot("bqgrs,bsgk->bqgrk", ds, k)
                return dq, (_dot("bqgrs,bqgrk->bsgk", ds, q), dv)

            def skip(dq):
                return dq, (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))

            return jax.lax.cond(jnp.any(seen), grads, skip, dq)

        dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, _F32), keys)
        return (dkv[0] + dk, dkv[1] + dv), dq

    zeros = tuple(jnp.zeros(x.shape, _F32) for x in keys[:2])
    queries = (_query_blocks(q_bthk, g, q_block), *_query_positions(mask, q_block))
    (dk, dv), dq = jax.lax.scan(query_block, zeros, (*queries, dout, m, z, d))
    # a row that saw no key output the mean of all values: its gradient reaches every value alike
    empty = jnp.where(z == 0, 1.0 / s, 0.0)[..., None] * dout.astype(_F32)
    dv_bsgv = _unblock(dv, s) + jnp.einsum("nbqgrv->bgv", empty)[:, None]
    dsinks = None
    if sinks_h is not None:  # the sink's probability exp(sink - m) / z, its gradient -p * D
        p_sink = jnp.exp(sinks_h.astype(_F32).reshape(g, h // g) - m) / z
        dsinks = (-jnp.einsum("nbqgr,nbqgr->gr", p_sink, d)).reshape(h).astype(sinks_h.dtype)
    dq_bthk = _unblock(dq, t).reshape(q_bthk.shape).astype(dt)
    return dq_bthk, _unblock(dk, s).astype(k_bsgk.dtype), dv_bsgv.astype(v_bsgv.dtype), dsinks, None


_attention.defvjp(_attention_fwd, _attention_bwd)

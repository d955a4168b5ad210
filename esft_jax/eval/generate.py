"""Batched greedy generation with a KV cache (MLA's compressed one, or GQA's keys and values).

Prompts are left-padded to a common length (padding has segment id 0, so it is never attended to),
prefilled in one pass, then decoded one token per step inside a `jax.lax.while_loop` that stops when
every row has produced an EOS id (any of them, where the model has several) or `max_new_tokens`
tokens. The prompt length is rounded up to a multiple of `bucket` so that batches of similar prompts
share one compilation.

With a mesh, params are expected sharded on it (sharding.shard_params); rows and the KV cache are
split over its batch axes (the batch padded with empty prompts to a multiple of them) and the experts
run expert-parallel, as in training: the same tokens as on one device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tokenizers import Tokenizer

from esft_jax import sharding
from esft_jax.eval.sampling import Sampling, next_tokens, sampling_for
from esft_jax.model import ModelConfig, forward_cached, init_cache, segment_positions


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids"))
def _decode(
    params,
    tokens_bp,
    segments_bp,
    sampling: Sampling | None,
    cfg: ModelConfig,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
):
    b, p = tokens_bp.shape
    cache = init_cache(cfg, b, p + max_new_tokens)
    positions = segment_positions(segments_bp)
    logits, cache = forward_cached(
        params, tokens_bp, cfg, cache, segment_ids_bt=segments_bp, positions_bt=positions
    )
    first = next_tokens(logits[:, -1], sampling, jnp.zeros((), jnp.int32))
    out = jnp.full((b, max_new_tokens), eos_ids[0], jnp.int32)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, pos, done, out, cache = carry
        out = out.at[:, i].set(jnp.where(done, eos_ids[0], token))
        done = done | jnp.isin(token, jnp.asarray(eos_ids, jnp.int32))
        logits, cache = forward_cached(
            params,
            token[:, None],
            cfg,
            cache,
            segment_ids_bt=jnp.ones((b, 1), jnp.int32),
            positions_bt=pos[:, None],
        )
        token = next_tokens(logits[:, 0], sampling, i + 1)
        return i + 1, token, pos + 1, done, out, cache

    empty = ~jnp.any(segments_bp != 0, axis=1)  # a padding row (no prompt) is done from the start
    start = (jnp.zeros((), jnp.int32), first, positions[:, -1] + 1, empty, out, cache)
    return jax.lax.while_loop(cond, body, start)[4]


def padded_rows(n: int, cfg: ModelConfig, mesh: Mesh | None) -> int:
    """The batch rows `generate` runs for n prompts: a multiple of the mesh's batch split (the padding
    rows have no prompt and are done from the start)."""
    multiple = sharding.rows_multiple(mesh, cfg.expert_parallel)
    return -(-n // multiple) * multiple


def generate(
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    bucket: int = 64,
    mesh: Mesh | None = None,
    sampling: Sequence[tuple[float, float, int]] | None = None,
) -> list[list[int]]:
    """Continuations (up to and excluding EOS) of one batch of token-id prompts: greedy, or with
    `sampling` one (temperature, top_p, seed) per prompt (eval/sampling.py; temperature 0: greedy).
    `eos_id`: the id that ends a row, or several (`cfg.stop_token_ids`: any ends it); -1: none."""
    eos_ids = tuple(int(i) for i in np.atleast_1d(eos_id)) or (-1,)
    width = -(-max(len(p) for p in prompts) // bucket) * bucket
    rows = padded_rows(len(prompts), cfg, mesh)
    tokens = np.zeros((rows, width), np.int32)
    segments = np.zeros((rows, width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :], segments[row, width - len(prompt) :] = prompt, 1
    tokens_bp, segments_bp = sharding.place_rows((tokens, segments), mesh)
    per_row = None
    if sampling is not None:
        settings = list(sampling) + [(0.0, 1.0, 0)] * (rows - len(prompts))  # padding rows: greedy
        per_row = sampling_for(*zip(*settings))
    with sharding.on_mesh(mesh):
        out = np.asarray(
            _decode(params, tokens_bp, segments_bp, per_row, cfg, max_new_tokens, eos_ids)
        )
    results = []
    for row in out[: len(prompts)].tolist():
        results.append(row[: next((i for i, t in enumerate(row) if t in eos_ids), len(row))])
    return results


def generate_text(
    params,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    mesh: Mesh | None = None,
) -> list[str]:
    """Greedy completions of text prompts (BOS prepended) or token-id prompts (a chat template's:
    data/tokenize.py prompt_ids), cut at the first stop string."""
    bos = [cfg.bos_token_id] if cfg.bos_token_id is not None else []
    eos = cfg.stop_token_ids or -1
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = [
            bos + tokenizer.encode(p, add_special_tokens=False).ids if isinstance(p, str) else p
            for p in prompts[start : start + batch_size]
        ]
        for ids in generate(
            params, cfg, batch, max_new_tokens=max_new_tokens, eos_id=eos, mesh=mesh
        ):
            text = tokenizer.decode(ids)
            cut = min([text.index(s) for s in stop if s in text], default=len(text))
            texts.append(text[:cut])
    return texts

"""`esft route`: one batch through the model, and each MoE layer's expert load."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esft_jax.app import checks, runtime
from esft_jax.app.checks import whole
from esft_jax.model import ModelConfig, forward
from esft_jax.routing.load import expert_counts, load_table


def check(c: ml_collections.ConfigDict) -> None:
    for key in ("batch_size", "seq_len", "top_experts"):
        whole(c, key)


def _route_tokens(c: ml_collections.ConfigDict, cfg: ModelConfig) -> np.ndarray:
    if not c.text:
        return np.random.default_rng(c.seed).integers(0, cfg.vocab_size, (c.batch_size, c.seq_len))
    ids = runtime.tokenizer(c).encode(c.text, add_special_tokens=False).ids
    ids = np.resize(np.asarray(ids), c.seq_len)  # repeat the text to fill the sequence
    return np.broadcast_to(ids, (c.batch_size, c.seq_len))


def run(c: ml_collections.ConfigDict) -> None:
    """Run one batch and print each MoE layer's expert load."""
    mesh = runtime.mesh(c)
    cfg, params = runtime.load_model(c, mesh)
    checks.within_positions(c, "seq_len", cfg)
    tokens = jnp.asarray(_route_tokens(c, cfg))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"model: {cfg.model_type}, {n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers "
        f"({cfg.num_moe_layers} MoE), {cfg.n_routed_experts} routed experts, top-{cfg.num_experts_per_tok}"
    )
    step = jax.jit(forward, static_argnames="cfg")
    if mesh is not None:
        with jax.set_mesh(mesh):
            _, routing, seconds = _timed(step, params, tokens, cfg)
    else:
        _, routing, seconds = _timed(step, params, tokens, cfg)
    print(
        f"mesh: {dict(c.mesh)} on {jax.default_backend()}; "
        f"batch {tokens.shape[0]} x {tokens.shape[1]} tokens; "
        f"forward {seconds * 1e3:.1f} ms (compiled), dropped assignments: {int(routing.dropped.sum())}\n"
    )
    counts = expert_counts(routing.expert_ids, jnp.ones(tokens.shape, bool), cfg.n_routed_experts)
    print(load_table(np.asarray(counts), cfg.moe_layer_ids, c.top_experts))


def _timed(step: Callable, params, tokens, cfg):
    jax.block_until_ready(step(params, tokens, cfg))  # compile
    start = time.perf_counter()
    logits, routing = jax.block_until_ready(step(params, tokens, cfg))
    return logits, routing, time.perf_counter() - start

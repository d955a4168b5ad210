"""The `esft` command line: `esft <command> --config path.py[:arg] [--config.key=value ...]`."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esft_jax import configs, sharding
from esft_jax.checkpoint import CheckpointError, load_checkpoint, load_tokenizer
from esft_jax.model import ConfigError, ModelConfig, forward, init_params, param_axes
from esft_jax.routing.load import expert_counts, load_table


def load_model(c: ml_collections.ConfigDict) -> tuple[ModelConfig, dict]:
    """From `c.checkpoint` (a Hugging Face directory) if set, else random weights for `c.model`."""
    if c.checkpoint:
        runtime = {k: c.model[k] for k in ("dtype", "moe_strategy", "capacity_factor") if k in c.model}
        return load_checkpoint(c.checkpoint, **runtime)
    cfg = configs.model_config(c.model)
    return cfg, init_params(cfg, jax.random.key(c.seed))


def _route_tokens(c: ml_collections.ConfigDict, cfg: ModelConfig) -> np.ndarray:
    if not c.text:
        return np.random.default_rng(c.seed).integers(0, cfg.vocab_size, (c.batch_size, c.seq_len))
    if not c.checkpoint:
        raise configs.ConfigFileError("--config.text needs --config.checkpoint (its tokenizer)")
    ids = load_tokenizer(c.checkpoint).encode(c.text).ids
    ids = np.resize(np.asarray(ids), c.seq_len)  # repeat the text to fill the sequence
    return np.broadcast_to(ids, (c.batch_size, c.seq_len))


def cmd_route(c: ml_collections.ConfigDict) -> None:
    """Run one batch and print each MoE layer's expert load."""
    cfg, params = load_model(c)
    tokens = jnp.asarray(_route_tokens(c, cfg))
    mesh_shape = dict(c.mesh)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {cfg.model_type}, {n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers "
          f"({cfg.num_moe_layers} MoE), {cfg.n_routed_experts} routed experts, top-{cfg.num_experts_per_tok}")
    step = jax.jit(forward, static_argnums=2)
    if math.prod(mesh_shape.values()) > 1:
        mesh = sharding.make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape.values())])
        params = sharding.shard_params(params, param_axes(cfg), mesh)
        with jax.set_mesh(mesh):
            _, routing, seconds = _timed(step, params, tokens, cfg)
    else:
        _, routing, seconds = _timed(step, params, tokens, cfg)
    print(f"mesh: {mesh_shape} on {jax.default_backend()}; batch {tokens.shape[0]} x {tokens.shape[1]} tokens; "
          f"forward {seconds * 1e3:.1f} ms (compiled), dropped assignments: {int(routing.dropped.sum())}\n")
    counts = expert_counts(routing.expert_ids, jnp.ones(tokens.shape, bool), cfg.n_routed_experts)
    print(load_table(np.asarray(counts), cfg.first_k_dense_replace, c.top_experts))


def _timed(step: Callable, params, tokens, cfg):
    jax.block_until_ready(step(params, tokens, cfg))  # compile
    start = time.perf_counter()
    logits, routing = jax.block_until_ready(step(params, tokens, cfg))
    return logits, routing, time.perf_counter() - start


COMMANDS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {"route": cmd_route}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="esft", description="Expert-Specialized Fine-Tuning in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.__doc__, description=fn.__doc__)
        p.add_argument("--config", required=True, help="path.py or path.py:arg, a file with get_config()")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --config.KEY=VALUE)")
    try:
        c = configs.load(args.config, [a.removeprefix("--config.") for a in rest])
        COMMANDS[args.command](c)
    except (configs.ConfigFileError, CheckpointError, ConfigError) as e:
        print(f"esft {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

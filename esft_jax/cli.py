"""The `esft` command line: `esft <command> --config path.py[:arg] [--config.key=value ...]`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esft_jax import (
    config_files,
    experiment,
    interrupt,
    report,
    runtime,
    step_cap,
    validate,
)
from esft_jax.builtin import suite as builtin_suite
from esft_jax.checkpoint import save_checkpoint
from esft_jax.checkpoint.adapter import load_with_adapter
from esft_jax.checkpoint.native_export import export_native
from esft_jax.errors import UserError
from esft_jax.eval.run import evaluate
from esft_jax.model import ModelConfig, forward
from esft_jax.routing import analyze
from esft_jax.routing import run as routing_run
from esft_jax.routing.load import expert_counts, load_table
from esft_jax.routing.sources import STATS_FILE, load_stats
from esft_jax.serve import launch as serve_launch
from esft_jax.train import loop as train_loop
from esft_jax.train import plan
from esft_jax.train.guard import DivergedError


def _route_tokens(c: ml_collections.ConfigDict, cfg: ModelConfig) -> np.ndarray:
    if not c.text:
        return np.random.default_rng(c.seed).integers(0, cfg.vocab_size, (c.batch_size, c.seq_len))
    ids = runtime.tokenizer(c).encode(c.text, add_special_tokens=False).ids
    ids = np.resize(np.asarray(ids), c.seq_len)  # repeat the text to fill the sequence
    return np.broadcast_to(ids, (c.batch_size, c.seq_len))


def cmd_route(c: ml_collections.ConfigDict) -> None:
    """Run one batch and print each MoE layer's expert load."""
    mesh = runtime.mesh(c)
    cfg, params = runtime.load_model(c, mesh)
    validate.within_positions(c, "seq_len", cfg)
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


def cmd_profile(c: ml_collections.ConfigDict) -> None:
    """Profile a model's routing on a task dataset; write stats.npz and summary.json."""
    profiled = routing_run.profile_routing(c)
    if profiled.skipped:
        print(f"skipped {profiled.skipped} malformed lines of {c.data}")
    if profiled.stats is None:  # not the writing process
        return
    out, stats = Path(c.out_dir), profiled.stats
    print(
        f"profiled {stats.tokens} tokens in {stats.sequences} sequences of {profiled.samples} samples -> "
        f"{out / STATS_FILE}, {out / routing_run.SUMMARY_FILE}"
        + (f", {out / 'logs'}" * c.official_logs)
    )


def cmd_select(c: ml_collections.ConfigDict) -> None:
    """Select experts per layer from routing statistics; write an ESFT expert config."""
    stats = load_stats(c.stats, c.top_k, c.num_experts)
    expert_config = routing_run.select_experts(stats, c, c.seed)
    path = expert_config.save(c.out)
    counts = [len(expert_config.experts[layer]) for layer in stats.layers]
    total = len(stats.layers) * stats.num_experts
    print(
        report.markdown_table(
            ["layer", *map(str, stats.layers)],
            [["experts", *map(str, counts)]],
            right=[False] + [True] * len(counts),
        )
    )
    print(
        f"{c.method} on {c.score} scores ({c.norm}, decimals={c.decimals}, p={c.p}): "
        f"{sum(counts)} of {total} routed experts ({sum(counts) / total:.1%} of routed-expert parameters) "
        f"-> {path}"
    )


def cmd_analyze(c: ml_collections.ConfigDict) -> None:
    """Routing concentration per task and overlap across tasks; a markdown report and heatmaps."""
    tasks = {name: load_stats(path, c.top_k, c.num_experts) for name, path in c.tasks.items()}
    out = Path(c.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = analyze.report(tasks, c.p)
    (out / "routing.md").write_text(text)
    for name, stats in tasks.items():
        analyze.heatmap(stats, out / f"heatmap_{name}.png", name)
    print(text + f"\n-> {out / 'routing.md'} and heatmap_<task>.png")


def cmd_train(c: ml_collections.ConfigDict) -> None:
    """Fine-tune with ESFT, FFT or LoRA (resumes from the workdir's checkpoints)."""
    summary = train_loop.train(c)
    print(json.dumps(summary, indent=1))


def cmd_export(c: ml_collections.ConfigDict) -> None:
    """Base checkpoint + adapter -> a full Hugging Face checkpoint directory."""
    inputs = (c.checkpoint, c.adapter)
    runtime.check_adapter_base(c, c.adapter)
    if c.dtype == "native":  # the base's files with the adapter's tensors, in the base's format
        out = export_native(c.checkpoint, c.adapter, c.out, overwrite=c.overwrite)
        print(f"{c.checkpoint} + {c.adapter} -> {out} (the base's format)")
        return
    cfg, params = load_with_adapter(c.checkpoint, c.adapter)
    out = save_checkpoint(
        c.out,
        cfg,
        params,
        tokenizer_from=c.checkpoint,
        overwrite=c.overwrite,
        inputs=inputs,
        dtype=None if c.dtype == "auto" else c.dtype,
    )
    print(f"{c.checkpoint} + {c.adapter} -> {out}")


def cmd_eval(c: ml_collections.ConfigDict) -> None:
    """Score a model (optionally with an adapter) on eval tasks, and its held-out perplexity."""
    evaluation = evaluate(c)
    for name, n in evaluation.samples.items():
        print(f"{name}: {c.tasks[name].scorer} {evaluation.scores[name]:.4f} over {n} samples")
    if "perplexity" in evaluation.scores:
        print(f"perplexity on {c.perplexity.data}: {evaluation.scores['perplexity']:.3f}")


def cmd_plan(c: ml_collections.ConfigDict) -> None:
    """Per-device memory of a train step for each method and device count (compiled, not run)."""
    need = max(c.devices)
    if (
        not c.topology and jax.device_count() < need
    ):  # simulate the devices: re-run with XLA's host count set
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={need}".strip()
        code = subprocess.call(
            [sys.executable, "-m", "esft_jax.cli", *sys.argv[1:]],
            env={**os.environ, "XLA_FLAGS": flags},
        )
        raise SystemExit(code)
    cfg = runtime.model_config(c) if c.checkpoint else config_files.model_config(c.model)
    validate.within_positions(c, "seq_len", cfg)
    print(
        plan.report(
            cfg,
            c.methods.split(","),
            tuple(c.devices),
            c.mesh_axis,
            batch_size=c.batch_size,
            micro_batch=c.micro_batch,
            seq_len=c.seq_len,
            optim=c.optim,
            device_memory_gb=c.device_memory_gb,
            topology=c.topology,
            expert_fraction=c.expert_fraction,
            expert_config=c.expert_config,
            lora_rank=c.lora_rank,
        )
    )


def cmd_data(c: ml_collections.ConfigDict) -> None:
    """Write the built-in task suite: <out>/train/<task>.jsonl and <out>/eval/<task>.jsonl."""
    out = Path(c.out)
    builtin_suite.write_suite(out, n_train=c.n_train, n_eval=c.n_eval, seed=c.seed, n_docs=c.n_docs)
    tasks = ", ".join([*builtin_suite.DOWNSTREAM, *builtin_suite.GENERAL])
    print(
        f"built-in suite ({tasks}: {c.n_train} train / {c.n_eval} eval samples each) "
        f"-> {out}/train, {out}/eval"
    )


def cmd_run(c: ml_collections.ConfigDict) -> None:
    """The whole ESFT study on one task: eval, profile, select, train every method, eval, table."""
    experiment.run(c)


def cmd_serve(c: ml_collections.ConfigDict) -> None:
    """Serve the base model and its adapters over an OpenAI-compatible HTTP API."""
    serve_launch.serve(c)


COMMANDS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "route": cmd_route,
    "profile": cmd_profile,
    "select": cmd_select,
    "analyze": cmd_analyze,
    "train": cmd_train,
    "export": cmd_export,
    "eval": cmd_eval,
    "run": cmd_run,
    "plan": cmd_plan,
    "data": cmd_data,
    "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="esft", description="Expert-Specialized Fine-Tuning in JAX"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.__doc__, description=fn.__doc__)
        p.add_argument(
            "--config", required=True, help="path.py or path.py:arg, a file with get_config()"
        )
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --config.KEY=VALUE)")
    try:
        overrides = [a.removeprefix("--config.") for a in rest]
        c = config_files.load(args.config, overrides, command=args.command)
        validate.model_overrides(c, overrides)
        validate.check(args.command, c)
        step_cap.from_environment(args.command, c)
        COMMANDS[args.command](c)
    except UserError as e:  # the input is wrong: one line naming what to fix
        print(f"esft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused: a full disk, a read-only or vanished directory
        where = f"{e.filename}: " if e.filename else ""
        print(f"esft {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except DivergedError as e:  # the input was fine, the run was not: exit 1
        print(f"esft {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: one line (where it struck, for training), no traceback
        print(f"esft {args.command}: {interrupt.line(e)}", file=sys.stderr)
        return interrupt.EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks 2 and 3: one train step of ESFT-Token / ESFT-Gate / FFT / LoRA in esft-jax, and the
PyTorch reference (transformers' DeepseekV2 with ESFT's freezing), same model, batch and sequence.

    .venv/bin/python benchmarks/train_step.py                  # the issue's config, 2 threads
    .venv/bin/python benchmarks/train_step.py --size large     # a larger one
    .venv/bin/python benchmarks/train_step.py --interleaved    # esft-jax's steps taking turns

Each (framework, method) runs in its own child process, so its peak RSS is its own; with
--interleaved, esft-jax's methods run in one process instead, their steps taking turns rep by rep,
for ratios a drifting machine does not skew. Step time is the
median of --reps steps after a warm-up (compile) step; forward tokens/s is a profiling forward pass.
The ESFT experts are selected the way the pipeline does (token p=0.2, gate p=0.1), from the routing of
the benchmark batch. The torch "ESFT" row trains the routed experts only: transformers 5 stores them
as fused [E, ...] tensors, so per-expert freezing is not possible there; it is a lower bound on ESFT
in torch (its backward is the same), everything else frozen and out of the optimizer as in ESFT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SIZES = {  # Hugging Face DeepseekV2 config fields
    "issue": dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
    ),
    "large": dict(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        moe_intermediate_size=192,
        num_hidden_layers=6,
        first_k_dense_replace=1,
        num_attention_heads=8,
        q_lora_rank=None,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
    ),
}
JAX_METHODS = ("fft", "lora", "esft_token", "esft_gate")
TORCH_METHODS = ("fft", "experts")


def _tokens(vocab: int, batch: int, seq: int):

    return np.random.default_rng(0).integers(3, vocab, (batch, seq)).astype(np.int32)


def step_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Unpadded rows [B, T] as the one micro-batch [1, B, T] a jitted train step takes."""

    return {
        "tokens": tokens[None],
        "segment_ids": np.ones_like(tokens)[None],
        "loss_mask": np.ones_like(tokens)[None],
        "positions": np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)[
            None
        ],
    }


def jax_step(size: str | dict, method: str, batch: int, seq: int, scan_layers: bool = False):
    """(one_step, info) for one method's compiled step in esft-jax: one_step() runs a step, carrying
    the donated state; info has the model's and the method's counts. `size` names SIZES or gives
    the config fields. A loop over the layers by default: with 4-6 layers it compiles as fast as a
    scan and steps faster (README)."""
    import tempfile

    import jax
    import jax.numpy as jnp

    from esft_jax.app import config_files
    from esft_jax.app.commands import train as train_command
    from esft_jax.app.commands.train import tree_bytes
    from esft_jax.expert_config import ExpertConfig
    from esft_jax.model import ModelConfig, init_params
    from esft_jax.routing import profile, scores, select
    from esft_jax.train.esft import ExpertSubset
    from esft_jax.train.fft import FullFineTune
    from esft_jax.train.lora import LoRA
    from esft_jax.train.method import save_adapter
    from esft_jax.train.optimizer import learning_rate, make_optimizer
    from esft_jax.train.step import make_train_step

    fields = SIZES[size] if isinstance(size, str) else size
    cfg = ModelConfig(model_type="deepseek_v2", scan_layers=scan_layers, **fields)
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(cfg.vocab_size, batch, seq)
    info = {
        "cfg": cfg,
        "params": params,
        "tokens": tokens,
        "tokens_per_step": batch * seq,
        "total_params": int(sum(x.size for x in jax.tree.leaves(params))),
    }
    if method.startswith("esft_"):
        kind, p = ("token", 0.2) if method == "esft_token" else ("gate", 0.1)
        seqs = [profile.Sequence(row, np.ones(seq, bool)) for row in tokens]
        stats = profile.collect(params, cfg, seqs, batch_size=batch, seq_len=seq, progress=False)
        chosen = select.per_layer(scores.expert_scores(stats, kind), "threshold", p=p)
        trainable = ExpertSubset.build(cfg, ExpertConfig(dict(zip(stats.layers, chosen))))
        info["selected_experts"] = f"{sum(map(len, chosen))}/{len(chosen) * cfg.n_routed_experts}"
    else:
        trainable = (
            FullFineTune()
            if method == "fft"
            else LoRA(rank=8, alpha=16.0, targets=("attention", "experts"))
        )
    optim = train_command.optim(
        config_files.load_file(str(Path(__file__).parents[1] / "configs" / "train.py"))
    )
    tx, schedule = make_optimizer(optim), learning_rate(optim)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable.init(params)}
    state["opt_state"] = tx.init(state["trainable"])
    step = make_train_step(trainable, cfg, tx, schedule)
    batches = step_batch(tokens)
    holder = {"state": state}

    def one_step():  # the state is donated: carry it from step to step
        holder["state"], metrics = step(holder["state"], params, batches)
        return metrics["loss"]

    def counts() -> dict:
        """The method's sizes, from the state as it stands."""
        out = {
            "trainable_params": trainable.num_trained(holder["state"]["trainable"]),
            "optimizer_state_bytes": tree_bytes(holder["state"]["opt_state"]),
            "checkpoint_bytes": tree_bytes(params),
        }
        with tempfile.TemporaryDirectory() as tmp:
            adapter = save_adapter(tmp, cfg, trainable, params, holder["state"]["trainable"])
            out["adapter_bytes"] = sum(f.stat().st_size for f in adapter.iterdir())
        return out

    info["counts"] = counts
    return one_step, info


def run_jax(
    size: str | dict, method: str, batch: int, seq: int, reps: int, scan_layers: bool = False
) -> dict:
    """One method's step time and sizes in esft-jax (and, for fft, the profiling forward's rate)."""
    import jax
    import jax.numpy as jnp
    from timing import seconds

    from esft_jax.model import forward

    one_step, info = jax_step(size, method, batch, seq, scan_layers)
    cfg, params = info["cfg"], info["params"]
    out = {k: info[k] for k in ("tokens_per_step", "total_params", "selected_experts") if k in info}
    if method == "fft":  # the profiling forward pass, measured once
        fwd = jax.jit(lambda p, t: forward(p, t, cfg))
        out["forward_tokens_per_s"] = (
            batch * seq / seconds(fwd, params, jnp.asarray(info["tokens"]), reps=reps)
        )
    out["step_s"] = seconds(one_step, reps=reps)
    return {**out, **info["counts"]()}


def interleaved(args) -> None:
    """esft-jax's methods in one process, their steps taking turns rep by rep: the ratios to FFT
    that a loaded machine's drift does not skew."""
    from timing import interleaved_seconds, machine

    from esft_jax.report import markdown_table

    steps, infos = {}, {}
    for m in JAX_METHODS:
        steps[m], infos[m] = jax_step(args.size, m, args.batch, args.seq, args.scan_layers)
    seconds = interleaved_seconds(steps, reps=args.reps)
    print(f"{machine()}; size {args.size}, batch {args.batch} x {args.seq}, {args.reps} reps")
    rows = [
        [
            m,
            infos[m].get("selected_experts", ""),
            f"{seconds[m]:.3f}",
            f"{seconds[m] / seconds['fft']:.2f}",
        ]
        for m in JAX_METHODS
    ]
    print(markdown_table(["method", "experts", "step s", "vs fft"], rows))


def run_torch(size: str, method: str, batch: int, seq: int, reps: int, threads: int) -> dict:
    import statistics
    import time

    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = transformers.DeepseekV2Config(**SIZES[size], max_position_embeddings=4096)
    model = transformers.DeepseekV2ForCausalLM(cfg)
    tokens = torch.as_tensor(_tokens(cfg.vocab_size, batch, seq), dtype=torch.long)
    out = {
        "tokens_per_step": batch * seq,
        "total_params": sum(p.numel() for p in model.parameters()),
    }
    if method == "fft":
        model.eval()
        with torch.no_grad():
            model(input_ids=tokens)
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                model(input_ids=tokens)
                times.append(time.perf_counter() - start)
        out["forward_tokens_per_s"] = batch * seq / statistics.median(times)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(method == "fft" or ".mlp.experts." in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    out["step_s"] = statistics.median(times)
    out["trainable_params"] = sum(p.numel() for p in trainable)
    out["optimizer_state_bytes"] = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    return out


def _child(args, framework: str, method: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        f"{framework}:{method}",
        "--size",
        args.size,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--reps",
        str(args.reps),
        "--threads",
        str(args.threads),
        *(["--scan-layers"] if args.scan_layers else []),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{framework}:{method} failed (status {status})")
    return {
        **json.loads(proc.stdout.read().strip().splitlines()[-1]),
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The model size, batch, sequence length and reps of a train-step benchmark."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--size", default="issue", choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    return ap


def main() -> None:
    ap = step_arguments(__doc__.split("\n")[0])
    ap.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (XLA:CPU uses every core)"
    )
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--scan-layers", action="store_true", help="esft-jax: lax.scan over the layers, not a loop"
    )
    ap.add_argument(
        "--interleaved", action="store_true", help="esft-jax's methods taking turns in one process"
    )
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.interleaved:
        interleaved(args)
        return
    if args.one:
        framework, method = args.one.split(":")
        fn = run_jax if framework == "jax" else run_torch
        extra = (args.scan_layers,) if framework == "jax" else (args.threads,)
        print(json.dumps(fn(args.size, method, args.batch, args.seq, args.reps, *extra)))
        return

    from esft_jax.report import markdown_table as table

    runs = {("jax", m): _child(args, "jax", m) for m in JAX_METHODS}
    if not args.no_torch:
        runs.update({("torch", m): _child(args, "torch", m) for m in TORCH_METHODS})
    fft = runs["jax", "fft"]
    print(
        f"size {args.size}: {json.dumps(SIZES[args.size])}; batch {args.batch} x {args.seq}, float32, "
        f"{os.cpu_count()} cores"
    )
    rows = []
    for (framework, method), r in runs.items():
        rows.append(
            [
                framework,
                method,
                r.get("selected_experts", ""),
                f"{r['step_s']:.3f}",
                f"{r['step_s'] / fft['step_s']:.2f}",
                f"{r['trainable_params']:,}",
                f"{r['optimizer_state_bytes'] / 1e6:.2f}",
                f"{r['optimizer_state_bytes'] / fft['optimizer_state_bytes']:.1%}",
                f"{r['adapter_bytes'] / 1e6:.2f} ({r['adapter_bytes'] / r['checkpoint_bytes']:.1%})"
                if "adapter_bytes" in r
                else "-",
                f"{r['peak_rss_mb']:.0f}",
            ]
        )
    print(
        table(
            [
                "framework",
                "method",
                "experts",
                "step s",
                "vs jax fft",
                "trainable",
                "optimizer MB",
                "optimizer vs fft",
                "adapter MB (of checkpoint)",
                "peak RSS MB",
            ],
            rows,
        )
    )
    if not args.no_torch:
        t_fft, t_exp = runs["torch", "fft"], runs["torch", "experts"]
        print(
            table(
                ["measure", "esft-jax", "torch", "torch / esft-jax"],
                [
                    [
                        "FFT step s",
                        f"{fft['step_s']:.3f}",
                        f"{t_fft['step_s']:.3f}",
                        f"{t_fft['step_s'] / fft['step_s']:.2f}",
                    ],
                    *[
                        [
                            f"ESFT step s ({m} vs torch routed experts)",
                            f"{runs['jax', m]['step_s']:.3f}",
                            f"{t_exp['step_s']:.3f}",
                            f"{t_exp['step_s'] / runs['jax', m]['step_s']:.2f}",
                        ]
                        for m in ("esft_token", "esft_gate")
                    ],
                    [
                        "forward tokens/s",
                        f"{fft['forward_tokens_per_s']:.0f}",
                        f"{t_fft['forward_tokens_per_s']:.0f}",
                        f"{fft['forward_tokens_per_s'] / t_fft['forward_tokens_per_s']:.2f}"
                        " (esft-jax / torch)",
                    ],
                ],
            )
        )


if __name__ == "__main__":
    main()

"""`esft run`: the whole ESFT study for one task, each step cached in the run directory.

vanilla eval -> profile -> select experts (one expert config per entry of `c.selections`) -> train
every method of `c.methods` ("fft", "lora", or "esft_<selection>") -> eval each on the task and
the general suite -> a markdown table in the spirit of the paper's Tables 1-2 (+ trainable
parameters, optimizer-state bytes, adapter bytes, train time, peak memory) and plots. Ablations are
just more selections (threshold p, score function, random experts, expert groups, trainable-module
flags). A step whose output exists is skipped, so a rerun only does what is missing. Each training
runs in a child process (its peak memory is its own); `c.launch = "print"` prints those commands,
one per method, for a cluster instead of running them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from esft_jax import runtime
from esft_jax.builtin import tasks as builtin_tasks
from esft_jax.data.records import read_jsonl
from esft_jax.eval.tasks import evaluate_task, perplexity, read_eval_jsonl
from esft_jax.expert_config import ExpertConfig
from esft_jax.routing import analyze, profile, scores, select
from esft_jax.routing.sources import STATS_FILE, load_stats


def _cached(path: Path, compute) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=1) + "\n")
    return value


def _evaluate(c: ml_collections.ConfigDict, suite: Path, adapter: str = "") -> dict:
    """Task score, general-suite scores and held-out perplexity of the base model (+ adapter)."""
    model = ml_collections.ConfigDict({**c.to_dict(), "adapter": adapter})
    cfg, params = runtime.load_model(model)
    tok = runtime.tokenizer(c)
    out = {}
    for name in [c.task, *c.general_tasks]:
        _, scorer, max_new = {**builtin_tasks.DOWNSTREAM, **builtin_tasks.GENERAL}[name]
        samples = read_eval_jsonl(suite / "eval" / f"{name}.jsonl", c.eval.limit)
        out[name], _ = evaluate_task(params, cfg, tok, samples, scorer=scorer, max_new_tokens=max_new,
                                     batch_size=c.eval.batch_size)
    held_out, _ = read_jsonl(suite / "eval" / "docs.jsonl")
    out["docs_ppl"] = perplexity(params, cfg, tok, held_out, seq_len=c.eval.seq_len, batch_size=c.eval.batch_size)
    return out


def _train_command(c: ml_collections.ConfigDict, method: str, run: Path, suite: Path) -> list[str]:
    kind = "esft" if method.startswith("esft_") else method
    args = [sys.executable, "-m", "esft_jax.cli", "train", "--config", f"configs/train.py:{kind}",
            f"--config.checkpoint={c.checkpoint}", f"--config.data.train={suite / 'train' / f'{c.task}.jsonl'}",
            f"--config.workdir={run / f'train_{method}'}", f"--config.optim.lr={c.lr.get(method, c.lr.esft)}",
            *(f"--config.{override}" for override in c.train)]
    if kind == "esft":
        selection = method.removeprefix("esft_")
        args.append(f"--config.expert_config={run / f'experts_{selection}.json'}")
    return args


def _train_child(c: ml_collections.ConfigDict, method: str, run: Path, suite: Path) -> dict:
    """`esft train` in a child process; returns its summary plus the child's peak RSS."""
    workdir = run / f"train_{method}"
    if (workdir / "summary.json").is_file():
        return json.loads((workdir / "summary.json").read_text())
    args = _train_command(c, method, run, suite)
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"training {method} failed:\n{proc.stderr.read()[-3000:]}")
    summary = json.loads((workdir / "summary.json").read_text())
    summary.update(peak_rss_mb=usage.ru_maxrss / 1024, wall_seconds=time.perf_counter() - start)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run(c: ml_collections.ConfigDict) -> Path:
    """Run (or finish) the study; returns the path of the markdown table."""
    run_dir = Path(c.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    suite = Path(c.suite_dir)
    if not (suite / "eval" / "docs.jsonl").is_file():
        builtin_tasks.write_suite(suite, seed=c.seed)
    print(f"[1/5] vanilla eval of {c.checkpoint}")
    results = {"vanilla": _cached(run_dir / "eval_vanilla.json", lambda: _evaluate(c, suite))}

    print(f"[2/5] profiling routing on {c.task}")
    if not (run_dir / "profile" / STATS_FILE).is_file():
        cfg, params = runtime.load_model(c)
        samples, _ = read_jsonl(suite / "train" / f"{c.task}.jsonl")
        seqs = profile.sequences(samples, runtime.tokenizer(c), cfg, seq_len=c.profile.seq_len,
                                 token_budget=c.profile.token_budget, seed=c.seed)
        profile.profile(params, cfg, seqs, batch_size=c.profile.batch_size, seq_len=c.profile.seq_len,
                        progress=False).save(run_dir / "profile" / STATS_FILE)
    stats = load_stats(run_dir / "profile")

    print("[3/5] selecting experts")
    for name, spec in c.selections.items():
        chosen = select.select(scores.expert_scores(stats, spec.score, spec.norm), spec.method, p=spec.p,
                               seed=c.seed, group_size=spec.group_size, grouping=spec.grouping,
                               coactivation_lee=stats.coactivation)
        if spec.shared_only:
            chosen = [[] for _ in chosen]
        ExpertConfig(dict(zip(stats.layers, chosen)), spec.shared_experts, spec.non_expert_modules).save(
            run_dir / f"experts_{name}.json")
    if c.launch == "print":
        for m in c.methods:
            print(" ".join(_train_command(c, m, run_dir, suite)))
        return run_dir / "results.md"

    print(f"[4/5] training {', '.join(c.methods)}")
    summaries = {m: _train_child(c, m, run_dir, suite) for m in c.methods}

    print("[5/5] evaluating the fine-tuned models")
    for m in c.methods:
        results[m] = _cached(run_dir / f"eval_{m}.json", lambda m=m: _evaluate(c, suite, str(run_dir / f"train_{m}" / "adapter")))
    table = report(c, results, summaries)
    (run_dir / "results.md").write_text(table)
    analyze.heatmap(stats, run_dir / "routing_heatmap.png", f"{c.task} (built-in model)")
    _score_plot(c, results, summaries, run_dir / "score_vs_params.png")
    print("\n" + table + f"\ntable: {run_dir / 'results.md'}; plots: {run_dir / 'routing_heatmap.png'}, "
          f"{run_dir / 'score_vs_params.png'}")
    return run_dir / "results.md"


def report(c: ml_collections.ConfigDict, results: dict, summaries: dict) -> str:
    general = list(c.general_tasks)
    head = (f"| method | {c.task} | " + " | ".join(general) + " | general avg | docs ppl | trainable params | "
            "optimizer state | adapter | train s | peak RSS |")
    lines = [head, "|---" * (len(general) + 9) + "|"]
    fft_params = summaries.get("fft", {}).get("trainable_params")
    for name, r in results.items():
        s = summaries.get(name, {})
        params = s.get("trainable_params")
        share = f" ({params / fft_params:.1%})" if params and fft_params else ""
        cells = [name, f"{r[c.task]:.3f}", *(f"{r[g]:.3f}" for g in general),
                 f"{sum(r[g] for g in general) / len(general):.3f}", f"{r['docs_ppl']:.2f}",
                 f"{params:,}{share}" if params else "-",
                 f"{s['optimizer_state_bytes'] / 1e6:.2f} MB" if s else "-",
                 f"{s['adapter_bytes'] / 1e6:.2f} MB" if s else "-",
                 f"{s['train_seconds']:.0f}" if s else "-",
                 f"{s['peak_rss_mb']:.0f} MB" if s.get("peak_rss_mb") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _score_plot(c, results: dict, summaries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, s in summaries.items():
        ax.scatter(s["trainable_params"], results[m][c.task], label=m)
    ax.axhline(results["vanilla"][c.task], color="grey", linestyle="--", label="vanilla")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{c.task} score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

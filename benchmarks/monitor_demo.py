"""The routing monitor on the built-in tiny MoE: an `intent` adapter's prompt coverage on the eval
prompts of every built-in task (intent: its domain; math, sort, facts, count: not), against its
routing profile, flagged with the server's rule.

    .venv/bin/python benchmarks/monitor_demo.py              # p=0.2, 200 steps, ood_ratio 0.5, 0.3
    .venv/bin/python benchmarks/monitor_demo.py --ood-ratio 0.5 0.8 # a flagged column for each
    .venv/bin/python benchmarks/monitor_demo.py --dir runs/monitor_demo --steps 20

Profiles the routing on the built-in intent train set (app/commands/profile.py profile_routing, the budget
and rows of configs/experiments/builtin.py), selects experts (ESFT-Token, threshold p) and trains
an ESFT adapter for `--steps` steps; training ends by measuring the adapter's routing profile (its
coverage on the task's prompts: esft_jax/train/routing_profile.py), written into the adapter.
Then, as `esft serve` does, it measures each prompt's coverage in the adapter's own forward pass
(Engine.coverage on the prompt alone: the server flags a request on its prompt, known after
prefill) and applies Monitor.flagged: flagged when in some MoE layer the coverage is below
ood_ratio x that layer's profiled coverage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from esft_jax.app import config_blocks, config_files
from esft_jax.app.commands.profile import profile_routing
from esft_jax.app.commands.select import select_experts
from esft_jax.app.commands.train import train
from esft_jax.builtin.suite import write_suite
from esft_jax.checkpoint import load_checkpoint, load_tokenizer
from esft_jax.expert_config import ExpertConfig
from esft_jax.report import markdown_table
from esft_jax.serve.engine import Engine, Request
from esft_jax.serve.monitor import Coverage, Monitor

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "esft_jax" / "builtin" / "tiny_moe")
PROMPT_SETS = ("intent", "math", "sort", "facts", "count")  # the built-in eval tasks


def _prompts(
    suite: Path, task: str, n: int, tokenizer, bos: int | None
) -> tuple[list[list[int]], list[list[int]]]:
    """(BOS + the ids of the first n eval prompts, as `esft serve` encodes a completion prompt;
    the ids of their reference answers, as the training template renders them: " {answer}")."""
    rows = [json.loads(x) for x in (suite / "eval" / f"{task}.jsonl").read_text().splitlines()[:n]]
    head = [bos] if bos is not None else []
    prompts = [head + tokenizer.encode(r["prompt"], add_special_tokens=False).ids for r in rows]
    answers = [tokenizer.encode(" " + r["answers"][0], add_special_tokens=False).ids for r in rows]
    return prompts, answers


def _adapter(out: Path, suite: Path, args: argparse.Namespace) -> tuple[Path, ExpertConfig]:
    """Profile, select, train: (the adapter directory, its expert config, profile included)."""
    c = config_files.load_file(str(ROOT / "configs/profile.py"))
    c.checkpoint, c.data, c.progress = MODEL, str(suite / "train/intent.jsonl"), False
    c.token_budget, c.seq_len, c.batch_size = 32 * 1024, 256, 16  # configs/experiments/builtin.py
    c.out_dir = str(out / "profile")
    stats = profile_routing(c).stats
    experts = select_experts(stats, config_blocks.selection("token", args.p), 0)
    experts.save(out / "experts_token.json")
    t = config_files.load_file(str(ROOT / "configs/train.py") + ":esft")
    t.checkpoint, t.expert_config = MODEL, str(out / "experts_token.json")
    t.data.train, t.data.seq_len = str(suite / "train/intent.jsonl"), 256
    t.steps, t.batch_size, t.optim.lr, t.optim.warmup_steps = args.steps, 8, 3e-3, 2
    t.log_every = t.eval_every = t.checkpoint_every = args.steps
    t.workdir = str(out / "train_esft_token")
    train(t, progress=False)
    return out / "train_esft_token" / "adapter", experts


def _cpu() -> str:
    lscpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True)
    return f"{' '.join(lscpu.stdout.split()[2:]) or 'CPU'}; {os.cpu_count()} cores"


def _ratios(covs: list[Coverage], profile: dict) -> np.ndarray:
    """[requests, layers] coverage / profiled coverage, over the layers the adapter trains."""
    want = np.asarray(profile["per_layer"], np.float64)
    got = np.array([c.per_layer for c in covs], np.float64)
    return got[:, want > 0] / want[want > 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="", help="work directory (default: a temporary one)")
    parser.add_argument("--n", type=int, default=32, help="eval prompts per prompt set")
    parser.add_argument(
        "--steps", type=int, default=200, help="ESFT training steps (builtin.py's 200)"
    )
    parser.add_argument("--p", type=float, default=0.2, help="ESFT-Token threshold")
    parser.add_argument(
        "--ood-ratio", type=float, nargs="+", default=[0.5, 0.3], help="a flagged column for each"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.dir or tmp)
        suite = write_suite(out / "suite")
        start = time.perf_counter()
        adapter, experts = _adapter(out, suite, args)
        prepared = time.perf_counter() - start
        cfg, params = load_checkpoint(MODEL)
        tokenizer = load_tokenizer(MODEL)
        engine = Engine(cfg, params, {"intent": adapter})
        profile = engine.bank.profile("intent")  # adapter_config.json's, as the server reads it
        assert profile is not None, f"{adapter}: the adapter carries no routing profile"
        monitors = [
            Monitor(engine.bank, ood_ratio=r, layers=cfg.moe_layer_ids) for r in args.ood_ratio
        ]
        rows, per_layer = [], {}
        for task in PROMPT_SETS:
            prompts, answers = _prompts(suite, task, args.n, tokenizer, cfg.bos_token_id)
            requests = [Request(p, "intent", max_tokens=1) for p in prompts]
            covs = engine.coverage(requests, [[]] * len(requests))  # the prompt's coverage
            low = _ratios(covs, profile).min(axis=1)  # per request: its lowest layer's ratio
            # with the reference answer: documents like the profiled ones (not what is flagged)
            whole = _ratios(engine.coverage(requests, answers), profile).min(axis=1)
            totals = np.array([c.total for c in covs])
            per_layer[task] = np.mean([c.per_layer for c in covs], axis=0)
            shares = [np.mean([m.flagged("intent", c) for c in covs]) for m in monitors]
            rows.append(
                [
                    task,
                    str(len(covs)),
                    f"{np.mean([len(p) for p in prompts]):.0f}",
                    f"{totals.mean():.3f}",
                    f"{totals.mean() / profile['total']:.2f}",
                    f"{low.mean():.2f}",
                    f"{low.min():.2f}",
                    f"{low.max():.2f}",
                    f"{whole.mean():.2f}",
                    *(f"{share:.0%}" for share in shares),
                ]
            )
    print(_cpu())
    print(
        f"built-in tiny MoE, adapter 'intent': ESFT-Token p={args.p}, "
        f"{experts.num_selected()} of {cfg.num_moe_layers * cfg.n_routed_experts} routed experts "
        f"({profile['tokens']} profiled tokens), {args.steps} train steps; "
        f"profile+select+train {prepared:.0f} s; prompt coverage, in the adapter's forward pass"
    )
    head = ["prompt set", "requests", "prompt tokens", "mean coverage", "/ profiled total"]
    head += ["min-layer ratio: mean", "min", "max", "with the answer: mean"]
    head += [f"flagged @ ood_ratio={r}" for r in args.ood_ratio]
    print(f"profiled total coverage {profile['total']:.3f}")
    print(markdown_table(head, rows, right=[False] + [True] * (len(head) - 1)))
    layer_rows = [
        [str(layer), str(len(experts.experts.get(layer, []))), f"{want:.3f}"]
        + [f"{per_layer[t][i]:.3f}" for t in PROMPT_SETS]
        for i, (layer, want) in enumerate(zip(cfg.moe_layer_ids, profile["per_layer"]))
    ]
    head = ["MoE layer", "trained experts", "profiled"] + [f"{t} (mean)" for t in PROMPT_SETS]
    print(markdown_table(head, layer_rows, right=[False] + [True] * (len(head) - 1)))


if __name__ == "__main__":
    main()

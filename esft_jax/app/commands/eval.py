"""`esft eval` and the evaluations of `esft run`: a model (+ adapter) on eval tasks and held-out text.

The config is configs/eval.py's: the model source (checkpoint, adapter, model, tokenizer, seed,
mesh), `tasks` (name -> data, format, scorer, max_new_tokens, limit, stop: strings split by "|"; a task
without data is skipped), `perplexity` (data, format, seq_len), batch_size, judge and out_dir.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import ml_collections

from esft_jax.app import checks, runtime
from esft_jax.app.checks import (
    input_path,
    one_of,
    template,
    value_at,
    whole,
    writable_dir,
)
from esft_jax.app.config_files import ConfigFileError
from esft_jax.data.records import Sample
from esft_jax.data.sources import FORMATS, read_samples
from esft_jax.eval.judge import Judge
from esft_jax.eval.metrics import EvalSample, evaluate_task, perplexity, read_eval_set
from esft_jax.eval.scorers import SCORERS

SCORES_FILE = "scores.json"


class Evaluation(NamedTuple):
    scores: dict[str, float]  # task name (and "perplexity") -> value, as written to scores.json
    samples: dict[str, int]  # task name -> samples scored


def stop_strings(stop: str) -> list[str]:
    """A config's "a|b" stop field -> ["a", "b"] (empty parts dropped)."""
    return [s for s in stop.split("|") if s]


def _read_sets(
    c: ml_collections.ConfigDict,
) -> tuple[dict[str, list[EvalSample]], Sequence[Sample] | None]:
    """(each task's eval set, the held-out set or None), every row checked (DataError naming it)."""
    tasks = {
        name: read_eval_set(task.data, task.limit, task.format)
        for name, task in c.tasks.items()
        if task.data
    }
    if not c.perplexity.data:
        return tasks, None
    held_out, _ = read_samples(c.perplexity.data, format=c.perplexity.format)
    if c.perplexity.limit:
        held_out = held_out.subset(range(min(c.perplexity.limit, len(held_out))))
    return tasks, held_out


def judge_from_config(c: ml_collections.ConfigDict) -> Judge | None:
    """The judge a config's `judge` block names (base_url, model, api_key_env[, retries]); None
    when base_url is empty."""
    if not c.base_url:
        return None
    return Judge(c.base_url, c.model, os.environ.get(c.api_key_env, ""), c.get("retries", 3))


def evaluate(c: ml_collections.ConfigDict) -> Evaluation:
    """Score every task with data; write <out_dir>/<task>.jsonl (per-sample predictions and scores)
    and <out_dir>/scores.json."""
    task_sets, held_out = _read_sets(c)  # before the model loads or out_dir is made
    mesh = runtime.mesh(c)
    cfg, params = runtime.load_model(c, mesh)
    if c.perplexity.data:
        checks.within_positions(c, "perplexity.seq_len", cfg)
    tokenizer = runtime.tokenizer(c)
    template = runtime.chat_template(c, "template", tokenizer, cfg)
    judge = judge_from_config(c.judge)
    out = Path(c.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = Evaluation({}, {})
    for name, samples in task_sets.items():
        task = c.tasks[name]
        mean, records = evaluate_task(
            params,
            cfg,
            tokenizer,
            samples,
            scorer=task.scorer,
            max_new_tokens=task.max_new_tokens,
            stop=stop_strings(task.stop),
            batch_size=c.batch_size,
            judge=judge,
            mesh=mesh,
            template=template,
        )
        (out / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        )
        result.scores[name], result.samples[name] = mean, len(records)
    if held_out is not None:
        result.scores["perplexity"] = perplexity(
            params,
            cfg,
            tokenizer,
            held_out,
            mesh=mesh,
            seq_len=c.perplexity.seq_len,
            batch_size=c.batch_size,
            template=template,
        )
    (out / SCORES_FILE).write_text(json.dumps(result.scores, indent=1) + "\n")
    return result


def check_scoring(c: ml_collections.ConfigDict, key: str, judge: ml_collections.ConfigDict) -> None:
    one_of(c, f"{key}.scorer", ["judge", *SCORERS])
    whole(c, f"{key}.max_new_tokens")
    if value_at(c, f"{key}.scorer") == "judge" and not judge.base_url:
        raise ConfigFileError(
            f"--config.{key}.scorer=judge: needs an endpoint (--config.judge.base_url, "
            f"--config.judge.model)"
        )


def check(c: ml_collections.ConfigDict) -> None:
    tasks = [name for name, task in c.tasks.items() if task.data]
    if not tasks and not c.perplexity.data:
        raise ConfigFileError(
            "--config.tasks: no task to evaluate (set --config.tasks.NAME.data or "
            "--config.perplexity.data)"
        )
    for name in tasks:
        input_path(c, f"tasks.{name}.data", f"task {name}'s eval set")
        one_of(c, f"tasks.{name}.format", FORMATS)
        check_scoring(c, f"tasks.{name}", c.judge)
        whole(c, f"tasks.{name}.limit", 0)
    if c.perplexity.data:
        input_path(c, "perplexity.data", "a held-out dataset")
        one_of(c, "perplexity.format", FORMATS)
        whole(c, "perplexity.seq_len", 2)
        whole(c, "perplexity.limit", 0)
    template(c, "template")
    whole(c, "batch_size")
    writable_dir(c, "out_dir")


def run(c: ml_collections.ConfigDict) -> None:
    """Score a model (optionally with an adapter) on eval tasks, and its held-out perplexity."""
    evaluation = evaluate(c)
    for name, n in evaluation.samples.items():
        print(f"{name}: {c.tasks[name].scorer} {evaluation.scores[name]:.4f} over {n} samples")
    if "perplexity" in evaluation.scores:
        print(f"perplexity on {c.perplexity.data}: {evaluation.scores['perplexity']:.3f}")

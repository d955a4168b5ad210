"""Evaluating a model on a task (generate, then score) and on held-out text (perplexity).

Eval sets use ESFT's format: one {"prompt": ..., "answers": [...]} per line, the prompt ending
where the model should start answering (e.g. "...\\n\\nAssistant:").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tokenizers import Tokenizer
from tqdm import tqdm

from esft_jax import sharding
from esft_jax.data.pipeline import eval_batches
from esft_jax.data.records import Sample, parse_jsonl
from esft_jax.eval.generate import generate_text
from esft_jax.eval.judge import Judge
from esft_jax.eval.scorers import SCORERS
from esft_jax.model import ModelConfig, forward
from esft_jax.model.loss import next_token_loss


@dataclasses.dataclass(frozen=True)
class EvalSample:
    prompt: str
    answers: list[str]
    source: str


def _eval_sample(obj: Any, source: str) -> EvalSample:
    answers = obj.get("answers") if isinstance(obj, dict) else None
    if not (
        isinstance(obj, dict)
        and isinstance(obj.get("prompt"), str)
        and isinstance(answers, list)
        and answers
        and all(isinstance(a, str) for a in answers)
    ):
        raise ValueError('expected {"prompt": str, "answers": [str, ...]}')
    return EvalSample(obj["prompt"], answers, source)


def read_eval_jsonl(path: str | Path, limit: int = 0) -> list[EvalSample]:
    """The first `limit` samples (0: all) of an eval set; a bad line raises DataError naming file and line."""
    return parse_jsonl(path, _eval_sample, what="eval", limit=limit)[0]


def evaluate_task(
    params: Any,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    samples: Sequence[EvalSample],
    *,
    scorer: str,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    judge: Judge | None = None,
    mesh: Mesh | None = None,
) -> tuple[float, list[dict]]:
    """(mean score, per-sample records with prediction and score); generation on `mesh` if given."""
    if scorer == "judge" and judge is None:
        raise ValueError("scorer 'judge' needs a judge endpoint (config judge.base_url)")
    if scorer != "judge" and scorer not in SCORERS:
        raise ValueError(f"scorer {scorer!r}: expected 'judge' or one of {sorted(SCORERS)}")
    predictions = []
    for start in tqdm(
        range(0, len(samples), batch_size), desc="generating", unit="batch", leave=False
    ):
        batch = samples[start : start + batch_size]
        predictions += generate_text(
            params,
            cfg,
            tokenizer,
            [s.prompt for s in batch],
            max_new_tokens=max_new_tokens,
            stop=stop,
            batch_size=batch_size,
            mesh=mesh,
        )
    records = []
    for sample, prediction in zip(samples, predictions):
        score = (
            judge.score(sample.prompt, prediction, sample.answers)
            if scorer == "judge"
            else SCORERS[scorer](prediction, sample.answers)
        )
        records.append(
            {
                "source": sample.source,
                "prediction": prediction,
                "answers": sample.answers,
                "score": score,
            }
        )
    return (sum(r["score"] for r in records) / max(len(records), 1)), records


def perplexity(
    params: Any,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    samples: Sequence[Sample],
    *,
    seq_len: int,
    batch_size: int = 8,
    mesh: Mesh | None = None,
) -> float:
    """exp(mean next-token loss over the answer tokens (all tokens of plain text) of held-out samples);
    on `mesh` if given (batches padded with empty rows to split over its batch axes)."""
    step = jax.jit(
        lambda p, b: next_token_loss(
            forward(
                p, b["tokens"], cfg, segment_ids_bt=b["segment_ids"], positions_bt=b["positions"]
            )[0],
            b,
        )
    )
    total, count = 0.0, 0
    multiple = sharding.rows_multiple(mesh, cfg.expert_parallel)
    rows = -(-batch_size // multiple) * multiple
    for batch in eval_batches(
        list(samples), tokenizer, cfg, seq_len=seq_len, batch_size=batch_size
    ):
        batch = {
            k: np.pad(v, [(0, rows - v.shape[0])] + [(0, 0)] * (v.ndim - 1))
            for k, v in batch.items()
        }
        with sharding.on_mesh(mesh):
            loss_sum, n = step(params, sharding.place_rows(batch, mesh))
        total, count = total + float(loss_sum), count + int(n)
    return math.exp(total / max(count, 1))

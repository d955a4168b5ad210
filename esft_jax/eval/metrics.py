"""Evaluating a model on a task (generate, then score) and on held-out text (perplexity).

Eval sets hold one {"prompt": ..., "answers": [...]} per row (jsonl, json, parquet, arrow:
data/sources.py): ESFT's format, the prompt text ending where the model should start answering
(e.g. "...\\n\\nAssistant:"), encoded as BOS + its tokens; or {"messages": [...], "answers": [...]}
(and "tools"), a conversation rendered by the chat template with its generation prompt
(data/chat.py), as training and `esft serve` render it.
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
from esft_jax.data import chat, records
from esft_jax.data.chat import ChatTemplate
from esft_jax.data.pipeline import eval_batches
from esft_jax.data.records import DataError, Sample
from esft_jax.data.sources import read_rows
from esft_jax.data.tokenize import chat_template, prompt_ids
from esft_jax.eval.generate import generate_text
from esft_jax.eval.judge import Judge
from esft_jax.eval.scorers import SCORERS
from esft_jax.model import ModelConfig
from esft_jax.model.loss import batch_loss


@dataclasses.dataclass(frozen=True)
class EvalSample:
    prompt: str  # the text prompt ("" for a conversation)
    answers: list[str]
    source: str
    messages: tuple[dict[str, Any], ...] = ()  # a conversation to continue
    tools: tuple[dict[str, Any], ...] | None = None


def _eval_sample(obj: Any, source: str) -> EvalSample:
    answers = obj.get("answers") if isinstance(obj, dict) else None
    if not (
        isinstance(obj, dict)
        and (isinstance(obj.get("prompt"), str) or "messages" in obj)
        and isinstance(answers, list)
        and answers
        and all(isinstance(a, str) for a in answers)
    ):
        raise ValueError(
            'expected {"prompt": str, "answers": [str, ...]} or {"messages": [...], "answers": [...]}'
        )
    if "messages" in obj:
        chat = records.messages(obj["messages"])
        return EvalSample("", answers, source, chat, records.tools(obj.get("tools")))
    return EvalSample(obj["prompt"], answers, source)


def _prompt(
    sample: EvalSample, tokenizer: Tokenizer, template: ChatTemplate
) -> tuple[str, str | list[int]]:
    """(the prompt's text, for the judge and the records; what generate_text continues: the text,
    or a conversation's ids); DataError naming the sample where the template refuses it."""
    if not sample.messages:
        return sample.prompt, sample.prompt
    try:
        text = chat.prompt(template, sample.messages, sample.tools)[0]
        return text, prompt_ids(tokenizer, template, sample.messages, sample.tools)
    except ValueError as e:
        raise DataError(f"{sample.source}: {e}") from None


def read_eval_set(path: str | Path, limit: int = 0, format: str = "auto") -> list[EvalSample]:
    """The first `limit` samples (0: all) of an eval set; a bad row raises DataError naming file and
    row (data/sources.py)."""
    columns = [("prompt", "answers"), ("messages", "answers")]
    rows, _ = read_rows(
        path, _eval_sample, what="eval", format=format, limit=limit, columns=columns
    )
    return list(rows)


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
    template: ChatTemplate | None = None,
) -> tuple[float, list[dict]]:
    """(mean score, per-sample records with prediction and score); generation on `mesh` if given;
    conversations rendered by `template` (None: ESFT's format)."""
    if scorer == "judge" and judge is None:
        raise ValueError("scorer 'judge' needs a judge endpoint (config judge.base_url)")
    if scorer != "judge" and scorer not in SCORERS:
        raise ValueError(f"scorer {scorer!r}: expected 'judge' or one of {sorted(SCORERS)}")
    template = template or chat_template(tokenizer, cfg)
    prompts = [_prompt(s, tokenizer, template) for s in samples]
    predictions = []
    for start in tqdm(
        range(0, len(samples), batch_size), desc="generating", unit="batch", leave=False
    ):
        batch = prompts[start : start + batch_size]
        predictions += generate_text(
            params,
            cfg,
            tokenizer,
            [p for _, p in batch],
            max_new_tokens=max_new_tokens,
            stop=stop,
            batch_size=batch_size,
            mesh=mesh,
        )
    records = []
    for sample, (text, _), prediction in zip(samples, prompts, predictions):
        score = (
            judge.score(text, prediction, sample.answers)
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
    template: ChatTemplate | None = None,
) -> float:
    """exp(mean next-token loss over the answer tokens (all tokens of plain text, a conversation's
    assistant turns rendered by `template`) of held-out samples); on `mesh` if given (batches
    padded with empty rows to split over its batch axes)."""
    step = jax.jit(lambda p, b: batch_loss(p, b, cfg)[:2])
    total, count = 0.0, 0
    multiple = sharding.rows_multiple(mesh, cfg.expert_parallel)
    rows = -(-batch_size // multiple) * multiple
    for batch in eval_batches(
        list(samples), tokenizer, cfg, seq_len=seq_len, batch_size=batch_size, template=template
    ):
        batch = {
            k: np.pad(v, [(0, rows - v.shape[0])] + [(0, 0)] * (v.ndim - 1))
            for k, v in batch.items()
        }
        with sharding.on_mesh(mesh):
            loss_sum, n = step(params, sharding.place_rows(batch, mesh))
        total, count = total + float(loss_sum), count + int(n)
    return math.exp(total / max(count, 1))

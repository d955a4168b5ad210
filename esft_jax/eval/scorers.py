"""Scoring generated answers against references; each scorer maps (prediction, answers) -> [0, 1].

- `intent`: the official ESFT intent metric. The prediction is cut at the first "。" or newline
  and parsed as JSON; it scores 1 when its intent and its full slot set equal a reference's (list-
  valued slots compared as sets, as the official scores treat them), else 0.
- `exact_match`: stripped strings equal.
- `chrf`, `bleu`: sacrebleu's sentence chrF / BLEU, scaled to [0, 1] (best over references).
- `rouge_l`: ROUGE-L F1 on characters for CJK text, on whitespace tokens otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

Scorer = Callable[[str, Sequence[str]], float]


def _parse_intent(text: str) -> Any:
    head = text.strip().split("。")[0].split("\n")[0].strip()
    try:
        return json.loads(head)
    except json.JSONDecodeError:
        return None


def _slots(slots: Any) -> Any:
    if not isinstance(slots, dict):
        return slots
    return {k: frozenset(map(str, v)) if isinstance(v, list) else v for k, v in slots.items()}


def intent(prediction: str, answers: Sequence[str]) -> float:
    pred = _parse_intent(prediction)
    if not isinstance(pred, dict):
        return 0.0
    for answer in answers:
        ref = _parse_intent(answer)
        if (
            isinstance(ref, dict)
            and pred.get("intent") == ref.get("intent")
            and _slots(pred.get("slots")) == _slots(ref.get("slots"))
        ):
            return 1.0
    return 0.0


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(prediction.strip() == a.strip() for a in answers))


def chrf(prediction: str, answers: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(prediction.strip(), [a.strip() for a in answers]).score / 100.0


def bleu(prediction: str, answers: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction.strip(), [a.strip() for a in answers]).score / 100.0


def _units(text: str) -> list[str]:
    """Characters when the text holds CJK characters (no spaces between words), else words."""
    if any("\u4e00" <= ch <= "\u9fff" for ch in text):
        return [ch for ch in text if not ch.isspace()]
    return text.split()


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, answers: Sequence[str]) -> float:
    best = 0.0
    pred = _units(prediction)
    for answer in answers:
        ref = _units(answer)
        lcs = _lcs(pred, ref)
        if lcs:
            p, r = lcs / len(pred), lcs / len(ref)
            best = max(best, 2 * p * r / (p + r))
    return best


SCORERS: dict[str, Scorer] = {
    "intent": intent,
    "exact_match": exact_match,
    "chrf": chrf,
    "bleu": bleu,
    "rouge_l": rouge_l,
}

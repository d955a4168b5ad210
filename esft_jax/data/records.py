"""Reading task datasets (jsonl) into prompt/answer samples, with errors that name file and line.

Two line formats:
- ESFT's SFT format: {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]},
  rendered as the official training template: prompt "User: {u}\\n\\nAssistant:", answer " {a}".
- plain text: {"text": t}: no prompt, the whole text is the answer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

PROMPT_TEMPLATE = "User: {user}\n\nAssistant:"
ANSWER_TEMPLATE = " {assistant}"


class DataError(ValueError):
    """A malformed dataset line; the message starts with 'file:line:'."""


@dataclasses.dataclass(frozen=True)
class Sample:
    prompt: str  # context the model reads but is not scored on ("" for plain text)
    answer: str
    source: str  # "file:line", for messages about this sample


def _parse(obj: object) -> tuple[str, str]:
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "messages" in obj:
        messages = obj["messages"]
        if (not isinstance(messages, list) or len(messages) != 2
                or not all(isinstance(m, dict) for m in messages)
                or [m.get("role") for m in messages] != ["user", "assistant"]):
            raise ValueError("'messages' must be [{'role': 'user', ...}, {'role': 'assistant', ...}]")
        user, assistant = (m.get("content") for m in messages)
        if not isinstance(user, str) or not isinstance(assistant, str):
            raise ValueError("each message needs a string 'content'")
        return PROMPT_TEMPLATE.format(user=user), ANSWER_TEMPLATE.format(assistant=assistant)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise ValueError("'text' must be a string")
        return "", obj["text"]
    raise ValueError("expected a 'messages' list or a 'text' string")


def read_jsonl(path: str | Path, skip_invalid: bool = False) -> tuple[list[Sample], int]:
    """(samples, number of skipped lines). Blank lines are ignored; a bad line raises DataError
    naming file and line, or is skipped and counted when skip_invalid; a file without samples raises."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such dataset file")
    samples, skipped = [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompt, answer = _parse(json.loads(line))
            except json.JSONDecodeError as e:
                error = f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})"
            except ValueError as e:
                error = f"{path}:{lineno}: {e}"
            else:
                samples.append(Sample(prompt, answer, f"{path}:{lineno}"))
                continue
            if not skip_invalid:
                raise DataError(error)
            skipped += 1
    if not samples:
        raise DataError(f"{path}: no samples ({'every line malformed' if skipped else 'the file is empty'})")
    return samples, skipped

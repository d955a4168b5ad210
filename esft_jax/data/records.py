"""Reading task datasets (jsonl) into prompt/answer samples, with errors that name file and line.

Two line formats:
- ESFT's SFT format: {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]},
  rendered as the official training template: prompt "User: {u}\\n\\nAssistant:", answer " {a}".
- plain text: {"text": t}: no prompt, the whole text is the answer.

`parse_jsonl` is the line reader under both this and the eval sets (eval/metrics.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

PROMPT_TEMPLATE = "User: {user}\n\nAssistant:"
ANSWER_TEMPLATE = " {assistant}"


class DataError(ValueError):
    """A malformed dataset line; the message starts with 'file:line:'."""


@dataclasses.dataclass(frozen=True)
class Sample:
    prompt: str  # context the model reads but is not scored on ("" for plain text)
    answer: str
    source: str  # "file:line", for messages about this sample


def _sample(obj: object, source: str) -> Sample:
    """One line's JSON as a Sample; ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "messages" in obj:
        messages = obj["messages"]
        if (
            not isinstance(messages, list)
            or len(messages) != 2
            or not all(isinstance(m, dict) for m in messages)
            or [m.get("role") for m in messages] != ["user", "assistant"]
        ):
            raise ValueError(
                "'messages' must be [{'role': 'user', ...}, {'role': 'assistant', ...}]"
            )
        user, assistant = (m.get("content") for m in messages)
        if not isinstance(user, str) or not isinstance(assistant, str):
            raise ValueError("each message needs a string 'content'")
        return Sample(
            PROMPT_TEMPLATE.format(user=user), ANSWER_TEMPLATE.format(assistant=assistant), source
        )
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise ValueError("'text' must be a string")
        return Sample("", obj["text"], source)
    raise ValueError("expected a 'messages' list or a 'text' string")


T = TypeVar("T")


def parse_jsonl(
    path: str | Path,
    parse: Callable[[Any, str], T],
    *,
    what: str,
    skip_invalid: bool = False,
    limit: int = 0,
) -> tuple[list[T], int]:
    """(parse(json, "file:line") of each line, the first `limit` of them if limit > 0; lines skipped).
    Blank lines are ignored; a line that is not JSON, or that `parse` rejects with a ValueError, raises
    DataError naming file and line, or is skipped and counted when skip_invalid. A missing file
    ("no such <what> file") or one without items raises."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such {what} file")
    items, skipped = [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = parse(json.loads(line), f"{path}:{lineno}")
            except json.JSONDecodeError as e:
                error = f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})"
            except ValueError as e:
                error = f"{path}:{lineno}: {e}"
            else:
                items.append(item)
                if len(items) == limit:
                    break
                continue
            if not skip_invalid:
                raise DataError(error)
            skipped += 1
    if not items:
        raise DataError(
            f"{path}: no samples ({'every line malformed' if skipped else 'the file is empty'})"
        )
    return items, skipped


def read_jsonl(path: str | Path, skip_invalid: bool = False) -> tuple[list[Sample], int]:
    """(samples, number of skipped lines) of a training dataset; errors and skip_invalid: `parse_jsonl`."""
    return parse_jsonl(path, _sample, what="dataset", skip_invalid=skip_invalid)

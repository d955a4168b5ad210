"""Rows of the common chat-data layouts as the canonical shapes a parse function reads
(data/records.py `_sample`): {"messages": [...]}, {"prompt", "completion"} or {"text"}.

- OpenAI-style {"messages": [{"role", "content"}, ...]}: as it is.
- ShareGPT {"conversations": [{"from", "value"}, ...], "system"?}: messages, each `from` mapped to
  its role (SHAREGPT_ROLES), a top-level system prompt first.
- Alpaca {"instruction", "input"?, "output", "system"?}: [system,] user = instruction, then input on
  the next line (as LLaMA-Factory joins them), assistant = output.
- Anything else (prompt/completion, text, an eval set's {"prompt", "answers"}): as it is, for the
  parse function to judge.
Other keys (e.g. "tools") are kept, so a chat template can use them.
"""

from __future__ import annotations

from typing import Any

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
}


def _sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise ValueError("'conversations' must be a list of {'from': ..., 'value': ...}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            raise ValueError(
                f"conversations[{i}]: 'from' must be one of {', '.join(SHAREGPT_ROLES)}"
            )
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{i}]: 'value' must be a string")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    rest = {k: v for k, v in row.items() if k not in ("conversations", "system")}
    return {**rest, "messages": _system(row) + messages}


def _alpaca(row: dict[str, Any]) -> dict[str, Any]:
    instruction, extra, output = row["instruction"], row.get("input") or "", row["output"]
    if not all(isinstance(x, str) for x in (instruction, extra, output)):
        raise ValueError("'instruction', 'input' and 'output' must be strings")
    user = f"{instruction}\n{extra}" if extra else instruction
    rest = {k: v for k, v in row.items() if k not in ("instruction", "input", "output", "system")}
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {**rest, "messages": _system(row) + messages}


def _system(row: dict[str, Any]) -> list[dict[str, str]]:
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("'system' must be a string")
    return [{"role": "system", "content": system}] if system else []


def canonical(row: Any) -> Any:
    """`row` in a canonical shape (module docstring); ValueError saying what is wrong."""
    if isinstance(row, dict) and "messages" not in row:
        if "conversations" in row:
            return _sharegpt(row)
        if "instruction" in row and "output" in row:
            return _alpaca(row)
    return row


def without_nulls(value: Any) -> Any:
    """`value` with every null-valued key dropped, at every depth: in a table (parquet, arrow) a
    field a row lacks reads as null, in JSON it is absent; this makes both rows alike."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value

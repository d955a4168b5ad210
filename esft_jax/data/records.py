"""Task dataset rows (data/sources.py reads the files, in any format) as training samples.

Three row shapes (data/canonical.py brings ShareGPT and Alpaca rows to the first):
- a conversation: {"messages": [{"role": str, "content": str, ...}, ...], "tools"?: [...]}, any
  roles and turns the chat template accepts, at least one assistant message; rendered by the chat
  template (data/chat.py), the assistant turns trained. ESFT's SFT files are such rows (user, assistant).
- prompt/completion: {"prompt": str, "completion": str}: plain text, the completion trained.
- plain text: {"text": str}: all of it trained.

data/sources.py reads both these and the eval sets (eval/metrics.py), naming file and row in errors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from esft_jax.errors import UserError


class DataError(UserError, ValueError):
    """A malformed dataset row or file; the message starts with where ('file:line:', 'file:row N:')."""


@dataclasses.dataclass(frozen=True)
class Sample:
    prompt: str  # plain context the model reads but is not scored on ("" for text and chats)
    answer: str  # plain text the model is scored on ("" for chats)
    source: str  # "file:line", for messages about this sample
    messages: tuple[dict[str, Any], ...] = ()  # a conversation, for the chat template
    tools: tuple[dict[str, Any], ...] | None = None  # tool schemas the template may show


def messages(value: Any, key: str = "messages") -> tuple[dict[str, Any], ...]:
    """A conversation as chat templates read it: a non-empty list of {"role": str, "content": str
    or a list of parts, ...}, content null or absent only beside "tool_calls"; ValueError else."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{key}' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"{key}[{i}]: expected an object with a 'role' string")
        content = m.get("content")
        if not (isinstance(content, (str, list)) or (content is None and m.get("tool_calls"))):
            raise ValueError(f"{key}[{i}]: 'content' must be a string (or a list of parts)")
    return tuple(value)


def tools(value: Any) -> tuple[dict[str, Any], ...] | None:
    """A row's "tools" (JSON schemas for the template), None where it has none."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError("'tools' must be a list of objects (JSON schemas)")
    return tuple(value)


def _sample(obj: object, source: str) -> Sample:
    """One row as a Sample; ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "messages" in obj:
        chat = messages(obj["messages"])
        if not any(m["role"] == "assistant" for m in chat):
            raise ValueError("'messages' has no assistant message to train on")
        return Sample("", "", source, chat, tools(obj.get("tools")))
    if "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise ValueError("'prompt' and 'completion' must be strings")
        return Sample(obj["prompt"], obj["completion"], source)
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise ValueError("'text' must be a string")
        return Sample("", obj["text"], source)
    raise ValueError(
        "expected a 'messages' list, 'prompt' and 'completion' strings or a 'text' string"
    )

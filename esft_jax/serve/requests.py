"""A completion request's body, checked at the HTTP boundary: read up to a size limit, parsed as
JSON, every field of the type and range OpenAI's API gives it. Whatever is wrong is an APIError
(4xx, OpenAI's error body) for this request alone; nothing unchecked reaches the engine, where a
bad value would fail the step of every request decoding with it.

The fields: `model` (a string), `prompt` (a string; completions) or `messages` and `tools` (chat:
data/records.py checks them), `max_tokens` (an integer >= 1, default 16; chat also reads
`max_completion_tokens`), `temperature` in [0, 2] (default 1), `top_p` in (0, 1], `seed` an integer
in [0, 2^63) as OpenAI's, `stop` a non-empty string or up to 4 of them, `stream` a boolean, `n` 1.
Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse

from esft_jax.data import records

DEFAULT_MAX_TOKENS = 16
MAX_BODY_BYTES = 4 * 2**20  # configs/serve.py's max_body_bytes
MAX_STOPS = 4  # OpenAI's
SEED_END = 2**63  # seeds lie in [0, SEED_END): OpenAI's int64 seeds, never negative


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error type and code."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.kind = status, code, kind

    def body(self) -> dict:
        return {
            "error": {"message": str(self), "type": self.kind, "param": None, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad(message: str) -> APIError:
    return APIError(400, message, "invalid_request")


@dataclasses.dataclass(frozen=True)
class Ask:
    """A completion request's fields, checked."""

    model: str
    prompt: str | None  # a completion's text (None for chat)
    messages: tuple[dict, ...] | None  # a chat's turns (None for a completion)
    tools: tuple[dict, ...] | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None  # in [0, SEED_END); None: a random one
    stops: tuple[str, ...]
    stream: bool


async def read_json(http: HTTPRequest, limit: int) -> dict:
    """The body as a JSON object; 413 where it is longer than `limit` bytes (by its Content-Length,
    else once that many have arrived: a longer body is never held whole), 400 where not JSON."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, an int of > 4300 digits
        raise bad(f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"the body is longer than {limit} bytes (--config.max_body_bytes)", "body_too_large"
    )


def field(body: dict, key: str, kinds: tuple[type, ...], default: Any = ...) -> Any:
    """body[key] of one of `kinds` (bool is no number), or `default` where absent or null."""
    value = body.get(key)
    if value is None:
        if default is ...:
            raise bad(f"'{key}' is required")
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise bad(f"'{key}': expected {names}, got {_shown(value)}")
    return value


def _number(body: dict, key: str, default: float, low: float, high: float, open_low: bool) -> float:
    """body[key], a number in [low, high] ((low, high] with open_low), else `default`."""
    value = field(body, key, (int, float), default)
    above = low < value if open_low else low <= value  # false for NaN; ints compare exactly
    if not (above and value <= high):
        where = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise bad(f"'{key}': expected a number in {where}, got {_shown(value)}")
    return float(value)


def _shown(value: Any) -> str:
    return json.dumps(value)[:80]


def _stops(body: dict) -> tuple[str, ...]:
    stop = field(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise bad(f"'stop': expected a non-empty string or a list of up to {MAX_STOPS} of them")
    return tuple(stops)


def _max_tokens(body: dict, chat: bool) -> int:
    value = field(body, "max_tokens", (int,), None)
    if chat and value is None:
        value = field(body, "max_completion_tokens", (int,), None)
    value = DEFAULT_MAX_TOKENS if value is None else value
    if value < 1:
        raise bad(f"'max_tokens': expected a whole number >= 1, got {value}")
    return value


def parse(body: dict, chat: bool) -> Ask:
    """The checked fields of a completion (chat: a chat completion) request body; 400 else."""
    model = field(body, "model", (str,))
    seed = field(body, "seed", (int,), None)
    if seed is not None and not 0 <= seed < SEED_END:
        raise bad(f"'seed': expected an integer in [0, 2^63), got {_shown(seed)}")
    if field(body, "n", (int,), 1) != 1:
        raise bad("'n': only 1 completion per request is served")
    try:
        messages = records.messages(body.get("messages")) if chat else None
        tools = records.tools(body.get("tools")) if chat else None
    except ValueError as e:
        raise bad(str(e)) from None
    return Ask(
        model=model,
        prompt=None if chat else field(body, "prompt", (str,)),
        messages=messages,
        tools=tools,
        max_tokens=_max_tokens(body, chat),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0, open_low=False),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        seed=seed,
        stops=_stops(body),
        stream=field(body, "stream", (bool,), False),
    )


def engine_seed(seed: int) -> int:
    """A request's seed in [0, 2^63) as the engine's PRNG seed in [0, 2^32): the high half folded
    into the low (seeds below 2^32 are their own)."""
    return (seed ^ (seed >> 32)) & 0xFFFFFFFF

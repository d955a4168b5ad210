"""`esft serve`: an OpenAI-compatible HTTP API (starlette + uvicorn) over one base model and its
ESFT adapters, any mix of them decoding together (continuous batching: serve/worker.py).

Endpoints: GET /v1/models (the base model and every adapter), POST /v1/completions and POST
/v1/chat/completions with `model` (the base's name or an adapter's), `prompt` (a string) or
`messages` (any turns and roles the chat template accepts, system and tool messages too) and
`tools`, rendered by the served chat template with its generation prompt as training renders them
(data/chat.py), `max_tokens`, `stop`, `temperature`, `top_p`, `seed` and `stream` (the fields and
their checks: serve/requests.py). Text prompts are BOS + the tokenizer's ids, as `esft eval`
encodes them; prompts are tokenised on a worker thread, so a long one holds up no other request.
`stream=True` answers in OpenAI's server-sent chunks ending with `data: [DONE]`, each piece of text
sent the step its token is chosen. Every response carries the routing monitor's verdict in an
"esft" field (on a stream: its last chunk); GET /v1/routing (JSON) shows the monitor's live
statistics per model (serve/monitor.py), GET /metrics (Prometheus) those and every request's
outcome (serve/metrics.py).

A bad request gets a 4xx with OpenAI's {"error": {"message", "type", "code"}} and the server goes on:
400 for malformed JSON, a missing or wrong field or a prompt longer than the model's context (or a
serving row) minus max_tokens; 401 for a missing or wrong API key (when one is configured); 404 for an
unknown model; 413 for a body over max_body_bytes. A request the engine fails gets a 500 (on a
stream: an error event), and only that request fails. A client that disconnects frees its
request's row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tokenizers import Encoding, Tokenizer

from esft_jax.data.chat import ChatTemplate
from esft_jax.data.tokenize import chat_template, prompt_ids
from esft_jax.serve import names
from esft_jax.serve import requests as bodies
from esft_jax.serve.completion import Completion
from esft_jax.serve.engine import Request
from esft_jax.serve.metrics import CLIENT_GONE, Metrics, Outcome
from esft_jax.serve.monitor import Monitor
from esft_jax.serve.requests import APIError, Ask
from esft_jax.serve.worker import Worker


class _Unlocked:
    """`tokenizer` whose `encode` lets other threads run meanwhile: Tokenizer.encode holds the GIL
    for the whole call (seconds for a prompt of megabytes), encode_batch releases it."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]


@dataclasses.dataclass
class _Track:
    """What is known of a request so far, to count its outcome by."""

    arrived: float  # time.monotonic()
    body: dict | None = None
    ask: Ask | None = None
    run: Completion | None = None


class Server:
    """The API's state: the engine's worker thread (and its engine), the tokenizer, the routing monitor, the
    served names, the API key, the fallback policy, the body size limit and the request counters
    (serve/metrics.py, with the audit log)."""

    def __init__(
        self,
        worker: Worker,
        tokenizer: Tokenizer,
        monitor: Monitor,
        *,
        base_name: str,
        api_key: str = "",
        fallback: bool = False,
        template: ChatTemplate | None = None,
        max_body_bytes: int = bodies.MAX_BODY_BYTES,
        audit_log: str | Path | None = None,
        log_prompts: bool = False,
    ):
        self.engine = worker.engine
        names.check(base_name, self.engine.bank.names)
        self.worker, self.tokenizer, self.monitor = worker, tokenizer, monitor
        self.template = template or chat_template(tokenizer, self.engine.cfg)
        self.base_name, self.api_key, self.fallback = base_name, api_key, fallback
        self.names = (base_name, *self.engine.bank.names)
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics(self.engine, monitor, audit_log=audit_log, log_prompts=log_prompts)
        self._encoder = _Unlocked(tokenizer)
        self.bos = self.engine.cfg.bos_token_id

    def close(self) -> None:
        """Stop the engine's worker (after the live requests) and close the audit log."""
        self.worker.close()
        self.metrics.close()

    def authorize(self, request: HTTPRequest) -> None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if self.api_key and not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(
                401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key"
            )

    def adapter(self, name: str) -> str | None:
        """The adapter named `name` (None: the base model); 404 for a name not served."""
        if name not in self.names:
            served = ", ".join(self.names)
            raise APIError(
                404, f"model {name[:100]!r} does not exist; served: {served}", "model_not_found"
            )
        return None if name == self.base_name else name

    def prompt_ids(self, ask: Ask) -> list[int]:
        """A chat's messages (and tools) + the generation prompt rendered by the served template
        as training renders them (data/tokenize.py prompt_ids; 400 where the template refuses
        them), or BOS + a prompt's ids. Slow for a long prompt: call it off the event loop."""
        if ask.messages is not None:
            try:
                return prompt_ids(self._encoder, self.template, ask.messages, ask.tools)
            except ValueError as e:
                raise bodies.bad(str(e)) from None
        bos = [self.bos] if self.bos is not None else []
        return bos + self._encoder.encode(ask.prompt, add_special_tokens=False).ids

    def request(self, body: dict, chat: bool) -> Request:
        """The engine request of a completion body; APIError for what the model cannot serve."""
        return self.engine_request(bodies.parse(body, chat))

    def engine_request(self, ask: Ask) -> Request:
        """The engine request of checked fields (its prompt tokenised: see prompt_ids)."""
        model = self.adapter(ask.model)
        ids = self.prompt_ids(ask)
        context = self.engine.cfg.max_position_embeddings
        if ids and len(ids) > context - ask.max_tokens:
            raise bodies.bad(
                f"the prompt's {len(ids)} tokens + max_tokens {ask.max_tokens} exceed the "
                f"model's context of {context} tokens"
            )
        seed = secrets.randbits(31) if ask.seed is None else bodies.engine_seed(ask.seed)
        request = Request(ids, model, ask.max_tokens, ask.temperature, ask.top_p, seed)
        try:
            self.engine.check(request)
        except ValueError as e:
            raise bodies.bad(str(e)) from None
        return request

    async def models(self, http: HTTPRequest) -> Response:
        self.authorize(http)
        created = int(time.time())
        models = [
            {"id": name, "object": "model", "created": created, "owned_by": "esft"}
            for name in self.names
        ]
        return JSONResponse({"object": "list", "data": models})

    async def routing(self, http: HTTPRequest) -> Response:
        """The routing monitor's live statistics per served model (Monitor.snapshot)."""
        self.authorize(http)
        return JSONResponse(self.monitor.snapshot())

    async def metrics_text(self, http: HTTPRequest) -> Response:
        """Every request's outcome and the monitor's statistics in Prometheus' text format."""
        self.authorize(http)
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def complete(self, http: HTTPRequest, chat: bool) -> Response:
        """A (chat) completion, counted by its outcome whatever it is (serve/metrics.py)."""
        track = _Track(time.monotonic())
        try:
            self.authorize(http)
            track.body = await bodies.read_json(http, self.max_body_bytes)
            track.ask = ask = bodies.parse(track.body, chat)
            request = await run_in_threadpool(self.engine_request, ask)
            track.run = run = Completion(
                self.worker, self.tokenizer, self.monitor, request, ask.stops, self.fallback
            )
            if await _unless_gone(http, run.start(), run) is None:
                return self._gone(track)
            head = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()),
                "model": ask.model,
            }
            if ask.stream:
                events = self._events(head, chat, track)
                return StreamingResponse(events, media_type="text/event-stream")
            text = await _unless_gone(http, run.text(), run)
            if text is None:
                return self._gone(track)
        except APIError as e:
            self._count(track, e.status, str(e))
            return e.response()
        except ClientDisconnect:  # while its body was read
            return self._gone(track)
        except Exception as e:  # the engine failed this request (only it); the server goes on
            failed = _failed(e)
            self._count(track, failed.status, str(failed))
            return failed.response()
        self._count(track, 200)
        n_prompt = len(request.prompt)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(run.tokens)}
        usage["total_tokens"] = n_prompt + len(run.tokens)
        obj = "chat.completion" if chat else "text_completion"
        choices = [_choice(chat, text, run.finish_reason, delta=False)]
        response = {**head, "object": obj, "choices": choices, "usage": usage}
        return JSONResponse({**response, "esft": self._metadata(run)})

    async def _events(self, head: dict, chat: bool, track: _Track) -> AsyncIterator[str]:
        """The server-sent events of a streamed completion: a chunk per piece of text as it is
        generated, then the finish reason (with the monitor's "esft" metadata) and [DONE]. Counted
        at their end: 200 when [DONE] was sent, 500 after an error event where the engine failed
        the request, 499 where the client went away first (the stream was cancelled or closed)."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        run, code, error = track.run, CLIENT_GONE, None
        try:
            async for piece in run.pieces():
                choice = _choice(chat, piece, None, delta=True)
                yield f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n"
            choices = [_choice(chat, None, run.finish_reason, True)]
            last = {**head, "object": obj, "choices": choices, "esft": self._metadata(run)}
            yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
            code = 200
        except Exception as e:
            failed = _failed(e)
            code, error = failed.status, str(failed)
            yield f"data: {json.dumps(failed.body())}\n\n"
        finally:
            self._count(track, code, error)

    def _gone(self, track: _Track) -> Response:
        """The response nobody reads, the client having gone; counted."""
        self._count(track, CLIENT_GONE)
        return Response(status_code=CLIENT_GONE)

    def _count(self, track: _Track, code: int, error: str | None = None) -> None:
        """Record a request's outcome (the metrics and the audit line)."""
        ask, run = track.ask, track.run
        asked = None if track.body is None else track.body.get("model")
        started = run is not None and run.first_token_at is not None
        prompt = None if ask is None else ask.prompt if ask.messages is None else list(ask.messages)
        self.metrics.record(
            Outcome(
                model=asked if asked in self.names else None,
                code=code,
                latency_s=time.monotonic() - track.arrived,
                first_token_s=run.first_token_at - track.arrived if started else None,
                completion_tokens=0 if run is None else len(run.tokens),
                prompt_tokens=0 if run is None else len(run.request.prompt),
                verdict=None if run is None else run.verdict,
                prompt=prompt,
                error=error,
            )
        )

    def _metadata(self, run: Completion) -> dict:
        """The response's "esft" field: the routing monitor's verdict on the request."""
        v = run.verdict
        profile = self.engine.bank.profile(v.adapter)
        final = v.coverage or v.prompt_coverage

        def name(model: str | None) -> str:
            return self.base_name if model is None else model

        return {
            "adapter": name(v.adapter),
            "served_by": name(v.served_by),
            "coverage": final.total,
            "coverage_per_layer": list(final.per_layer),
            "prompt_coverage": v.prompt_coverage.total,
            "profiled_coverage": None if profile is None else profile["total"],
            "flagged": v.flagged,
        }


def _failed(e: Exception) -> APIError:
    return APIError(500, f"generation failed: {e}", "server_error", "server_error")


async def _unless_gone(http: HTTPRequest, work, run: Completion):
    """`work`'s result, or None (the run cancelled) when the client disconnects first."""
    result = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(http))
    await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not result.done():
        result.cancel()
        run.cancel()
        return None
    return result.result()


async def _disconnect(http: HTTPRequest) -> None:
    """Returns when the client disconnects (the body has been read: nothing else arrives)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _choice(chat: bool, text: str | None, finish: str | None, delta: bool) -> dict:
    """One choice of a response (delta: of a stream chunk; text None: the chunk's end, no text)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if not chat:
        return {**choice, "text": text or "", "logprobs": None}
    message = {} if text is None else {"role": "assistant", "content": text}
    return {**choice, ("delta" if delta else "message"): message}


def app(server: Server) -> Starlette:
    """The starlette app of `server`'s endpoints; an APIError becomes its JSON error response."""

    def handler(fn):
        async def endpoint(http: HTTPRequest) -> Response:
            try:
                return await fn(http)
            except APIError as e:
                return e.response()

        return endpoint

    routes = [
        Route("/v1/models", handler(server.models), methods=["GET"]),
        Route("/v1/routing", handler(server.routing), methods=["GET"]),
        Route("/metrics", handler(server.metrics_text), methods=["GET"]),
        Route("/v1/completions", partial(server.complete, chat=False), methods=["POST"]),
        Route("/v1/chat/completions", partial(server.complete, chat=True), methods=["POST"]),
    ]
    return Starlette(routes=routes)

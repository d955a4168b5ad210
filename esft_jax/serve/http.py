"""`esft serve`: an OpenAI-compatible HTTP API (starlette + uvicorn) over one base model and its
ESFT adapters, any mix of them decoding together (continuous batching: serve/scheduler.py).

Endpoints: GET /v1/models (the base model and every adapter), POST /v1/completions and POST
/v1/chat/completions with `model` (the base's name or an adapter's), `prompt` (a string) or
`messages` (any turns and roles the chat template accepts, system and tool messages too) and
`tools`, rendered by the served chat template with its generation prompt as training renders them
(data/chat.py), `max_tokens` (default 16), `stop` (a string or a list: the text is cut at the
first), `temperature` (default 1.0, OpenAI's), `top_p`, `seed` and `stream`. Text prompts are BOS
+ the tokenizer's ids, as `esft eval` encodes them. `stream=True` answers in OpenAI's server-sent
chunks ending with `data: [DONE]`, each piece of text sent the step its token is chosen. Every
response carries the routing monitor's verdict in an "esft" field (on a stream: its last chunk);
GET /v1/routing (JSON) and GET /metrics (Prometheus) show the monitor's live statistics per model
(serve/monitor.py).

A bad request gets a 4xx with OpenAI's {"error": {"message", "type", "code"}} and the server goes on:
400 for malformed JSON, a missing or wrong field, max_tokens <= 0 or a prompt longer than the
model's context (or a slot) minus max_tokens; 401 for a missing or wrong API key (when one is
configured); 404 for an unknown model. A client that disconnects frees its request's slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ml_collections
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tokenizers import Tokenizer

from esft_jax import runtime, sharding
from esft_jax.data import records
from esft_jax.data.chat import ChatTemplate
from esft_jax.data.tokenize import chat_template, prompt_ids
from esft_jax.model import param_axes
from esft_jax.serve.completion import Completion
from esft_jax.serve.engine import Engine, Request
from esft_jax.serve.monitor import Monitor
from esft_jax.serve.scheduler import Scheduler

DEFAULT_MAX_TOKENS = 16


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error type and code."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.kind = status, code, kind

    def response(self) -> JSONResponse:
        error = {"message": str(self), "type": self.kind, "param": None, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def _bad(message: str) -> APIError:
    return APIError(400, message, "invalid_request")


def _field(body: dict, key: str, kinds: tuple[type, ...], default: Any = ...) -> Any:
    """body[key] of one of `kinds` (bool is no number), or `default` where absent or null."""
    value = body.get(key)
    if value is None:
        if default is ...:
            raise _bad(f"'{key}' is required")
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _bad(f"'{key}': expected {names}, got {json.dumps(value)[:80]}")
    return value


def _stops(body: dict) -> list[str]:
    stop = _field(body, "stop", (str, list), [])
    stops = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stops):
        raise _bad("'stop': expected a non-empty string or a list of them")
    return stops


def _chat_ids(tokenizer: Tokenizer, template: ChatTemplate, body: dict) -> list[int]:
    """The ids of a chat request's `messages` (and `tools`) + the generation prompt, rendered by the
    served chat template as training renders them (data/tokenize.py prompt_ids); 400 where the
    messages are malformed or the template refuses them."""
    try:
        return prompt_ids(
            tokenizer,
            template,
            records.messages(body.get("messages")),
            records.tools(body.get("tools")),
        )
    except ValueError as e:
        raise _bad(str(e)) from None


class Server:
    """The API's state: the scheduler (and its engine), the tokenizer, the routing monitor, the
    served names, the API key and the fallback policy."""

    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        monitor: Monitor,
        *,
        base_name: str,
        api_key: str = "",
        fallback: bool = False,
        template: ChatTemplate | None = None,
    ):
        self.engine = scheduler.engine
        if base_name in self.engine.bank.names:
            raise ValueError(f"adapter {base_name!r} has the base model's name")
        self.scheduler, self.tokenizer, self.monitor = scheduler, tokenizer, monitor
        self.template = template or chat_template(tokenizer, self.engine.cfg)
        self.base_name, self.api_key, self.fallback = base_name, api_key, fallback
        self.bos = self.engine.cfg.bos_token_id

    def authorize(self, request: HTTPRequest) -> None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if self.api_key and not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(
                401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key"
            )

    def adapter(self, body: dict) -> str | None:
        """The request's adapter (None: the base model); 404 for a name not served."""
        name = _field(body, "model", (str,))
        if name != self.base_name and name not in self.engine.bank.names:
            served = ", ".join([self.base_name, *self.engine.bank.names])
            raise APIError(
                404, f"model {name!r} does not exist; served: {served}", "model_not_found"
            )
        return None if name == self.base_name else name

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            return _chat_ids(self.tokenizer, self.template, body)
        text = _field(body, "prompt", (str,))
        bos = [self.bos] if self.bos is not None else []
        return bos + self.tokenizer.encode(text, add_special_tokens=False).ids

    def request(self, body: dict, chat: bool) -> Request:
        """The engine request of a completion body; APIError for what the model cannot serve."""
        model = self.adapter(body)
        max_tokens = _field(body, "max_tokens", (int,), None)
        if chat and max_tokens is None:
            max_tokens = _field(body, "max_completion_tokens", (int,), None)
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if max_tokens <= 0:
            raise _bad(f"'max_tokens': expected a whole number >= 1, got {max_tokens}")
        if _field(body, "n", (int,), 1) != 1:
            raise _bad("'n': only 1 completion per request is served")
        temperature = _field(body, "temperature", (int, float), 1.0)
        top_p = _field(body, "top_p", (int, float), 1.0)
        if not (0 <= temperature <= 2 and 0 < top_p <= 1):
            raise _bad("'temperature' must lie in [0, 2] and 'top_p' in (0, 1]")
        seed = _field(body, "seed", (int,), None)
        ids = self.prompt_ids(body, chat)
        context = self.engine.cfg.max_position_embeddings
        if ids and len(ids) > context - max_tokens:
            raise _bad(
                f"the prompt's {len(ids)} tokens + max_tokens {max_tokens} exceed the model's "
                f"context of {context} tokens"
            )
        seed = secrets.randbits(31) if seed is None else seed
        request = Request(ids, model, max_tokens, float(temperature), float(top_p), seed)
        try:
            self.engine.check(request)
        except ValueError as e:
            raise _bad(str(e)) from None
        return request

    async def models(self, http: HTTPRequest) -> Response:
        self.authorize(http)
        created = int(time.time())
        models = [
            {"id": name, "object": "model", "created": created, "owned_by": "esft"}
            for name in [self.base_name, *self.engine.bank.names]
        ]
        return JSONResponse({"object": "list", "data": models})

    async def routing(self, http: HTTPRequest) -> Response:
        """The routing monitor's live statistics per served model (Monitor.snapshot)."""
        self.authorize(http)
        return JSONResponse(self.monitor.snapshot())

    async def metrics(self, http: HTTPRequest) -> Response:
        """The same in Prometheus' text format."""
        self.authorize(http)
        return Response(self.monitor.prometheus(), media_type="text/plain; version=0.0.4")

    async def complete(self, http: HTTPRequest, chat: bool) -> Response:
        self.authorize(http)
        body = await _json_body(http)
        request = self.request(body, chat)
        stops, stream = _stops(body), _field(body, "stream", (bool,), False)
        run = Completion(
            self.scheduler, self.tokenizer, self.monitor, request, stops, self.fallback
        )
        try:
            verdict = await _unless_gone(http, run.start(), run)
            if verdict is None:
                return Response(status_code=499)  # the client has gone: nobody reads it
        except Exception as e:  # the step failed; the server goes on
            raise APIError(500, f"generation failed: {e}", "server_error", "server_error") from e
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body["model"],
        }
        if stream:
            events = _events(head, chat, run, self._metadata)
            return StreamingResponse(events, media_type="text/event-stream")
        text = await _unless_gone(http, run.text(), run)
        if text is None:
            return Response(status_code=499)
        n_prompt = len(request.prompt)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(run.tokens)}
        usage["total_tokens"] = n_prompt + len(run.tokens)
        obj = "chat.completion" if chat else "text_completion"
        choices = [_choice(chat, text, run.finish_reason, delta=False)]
        response = {**head, "object": obj, "choices": choices, "usage": usage}
        return JSONResponse({**response, "esft": self._metadata(run)})

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


async def _json_body(http: HTTPRequest) -> dict:
    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return body


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


async def _events(
    head: dict, chat: bool, run: Completion, metadata: Callable[[Completion], dict]
) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion: a chunk per piece of text as it is
    generated, then the finish reason (with the monitor's "esft" metadata) and [DONE]."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    async for piece in run.pieces():
        choice = _choice(chat, piece, None, delta=True)
        yield f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n"
    last = {**head, "object": obj, "choices": [_choice(chat, None, run.finish_reason, True)]}
    yield f"data: {json.dumps({**last, 'esft': metadata(run)})}\n\n"
    yield "data: [DONE]\n\n"


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
        Route("/metrics", handler(server.metrics), methods=["GET"]),
        Route(
            "/v1/completions", handler(lambda h: server.complete(h, chat=False)), methods=["POST"]
        ),
        Route(
            "/v1/chat/completions",
            handler(lambda h: server.complete(h, chat=True)),
            methods=["POST"],
        ),
    ]
    return Starlette(routes=routes)


def base_name(checkpoint: str) -> str:
    """The name the base model is served under: its checkpoint directory's."""
    return Path(checkpoint).resolve().name if checkpoint != runtime.RANDOM_WEIGHTS else checkpoint


def serve(c: ml_collections.ConfigDict) -> None:
    """Load c's model and adapters, and serve them on c.host:c.port until interrupted."""
    import uvicorn

    mesh = runtime.mesh(c)
    tokenizer = runtime.tokenizer(c)
    template = runtime.chat_template(c, "template", tokenizer, runtime.model_config(c))
    for adapter_dir in c.adapters.values():
        runtime.check_adapter_base(c, adapter_dir)
    cfg, params = runtime.load_model(c, mesh)
    if mesh is not None:  # random weights are made on one device
        params = sharding.shard_params(params, param_axes(cfg), mesh)
    engine = Engine(
        cfg, params, dict(c.adapters), mesh=mesh, slots=c.slots, max_len=c.max_len or None
    )
    name = base_name(c.checkpoint)
    m = c.monitor
    monitor = Monitor(
        engine.bank,
        ood_ratio=m.ood_ratio,
        audit_log=m.audit_log or None,
        log_prompts=m.log_prompts,
        base_name=name,
        layers=cfg.moe_layer_ids,
    )
    scheduler = Scheduler(engine)
    server = Server(
        scheduler,
        tokenizer,
        monitor,
        base_name=name,
        api_key=c.api_key,
        fallback=m.fallback,
        template=template,
    )
    names = ", ".join([server.base_name, *engine.bank.names])
    print(f"serving {names} on http://{c.host}:{c.port}/v1", flush=True)
    try:
        uvicorn.run(app(server), host=c.host, port=c.port, log_level="warning")
    finally:
        scheduler.close()
        monitor.close()

"""One request's run through the engine's worker thread as text, for an asyncio server: the pieces of text as
their tokens are chosen, cut at the first stop string, and the routing monitor's verdict.

The worker thread hands events over with `call_soon_threadsafe`; `pieces()` turns them
into text: it decodes the tokens so far and sends what is new, holding back a tail that could still
grow into a stop string or that ends in an unfinished UTF-8 character. A stop string cancels the
request at once (its row is free for the next), as does leaving `pieces()` early (a client that
went away). With `fallback`, a request that its prompt's routing flags out-of-domain is answered
by the base model instead: the verdict is known with the first token, before any text is sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence

from tokenizers import Tokenizer

from esft_jax.serve.engine import Event, Request
from esft_jax.serve.monitor import Coverage, Monitor
from esft_jax.serve.worker import Ticket, Worker


@dataclasses.dataclass
class Verdict:
    """What the monitor made of a request (the response's "esft" metadata)."""

    adapter: str | None  # the model asked for (None: the base)
    served_by: str | None  # the model that answered (the base after a fallback)
    prompt_coverage: Coverage  # on the asked adapter's experts, of the prompt: what is flagged
    flagged: bool
    coverage: Coverage | None = None  # of every token read, once finished


class Completion:
    """`request` run on `worker` (start it with `start`, then read `pieces`)."""

    def __init__(
        self,
        worker: Worker,
        tokenizer: Tokenizer,
        monitor: Monitor,
        request: Request,
        stops: Sequence[str] = (),
        fallback: bool = False,
    ):
        self.worker, self.tokenizer, self.monitor = worker, tokenizer, monitor
        self.request, self.stops, self.fallback = request, list(stops), fallback
        self.tokens: list[int] = []
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
        self.verdict: Verdict | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._ticket: Ticket | None = None
        self._first: Event | None = None
        self._started = time.monotonic()
        self.first_token_at: float | None = None  # time.monotonic() when the first token came

    def _submit(self, request: Request) -> None:
        loop = asyncio.get_running_loop()
        put = self._events.put_nowait
        self._ticket = self.worker.submit(request, lambda e: loop.call_soon_threadsafe(put, e))

    async def _next(self) -> Event:
        event = await self._events.get()
        if isinstance(event, Exception):
            raise event
        return event

    async def start(self) -> Verdict:
        """Submit the request and wait for its first token (and the monitor's verdict)."""
        self._submit(self.request)
        first = await self._next()
        asked, prompt = self.request.model, first.prompt_coverage
        flagged = self.monitor.flagged(asked, prompt)
        served_by = asked
        if flagged and self.fallback:
            self.cancel()
            self._events = asyncio.Queue()
            served_by = None
            self._submit(dataclasses.replace(self.request, model=None))
            first = await self._next()
        self._first, self.first_token_at = first, time.monotonic()
        self.verdict = Verdict(asked, served_by, prompt, flagged)
        return self.verdict

    def cancel(self) -> None:
        if self._ticket is not None:
            self._ticket.cancel()

    async def pieces(self) -> AsyncIterator[str]:
        """The text in pieces as it is generated (after `start`); cancels the request if left
        before its end."""
        sent, event = 0, self._first
        try:
            while True:
                if event.token is not None:
                    self.tokens.append(event.token)
                text = self.tokenizer.decode(self.tokens)
                cut = min([text.index(s) for s in self.stops if s in text], default=None)
                done = event.finished is not None or cut is not None
                end = cut if cut is not None else len(text) if done else self._safe_end(text)
                if end > sent:
                    yield text[sent:end]
                    sent = end
                if done:
                    self._finish(event, stopped=cut is not None)
                    return
                event = await self._next()
        finally:  # a stop string or a client gone: free the row (a no-op once finished)
            self.cancel()

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def _safe_end(self, text: str) -> int:
        """How much of `text` can be sent: not a tail that may start a stop string, nor an
        unfinished character (the replacement character of a partial UTF-8 sequence)."""
        end = len(text.rstrip("\ufffd"))
        held = [
            next(
                (k for k in range(min(len(stop) - 1, end), 0, -1) if text[:end].endswith(stop[:k])),
                0,
            )
            for stop in self.stops
        ]
        return end - max(held, default=0)

    def _finish(self, event: Event, stopped: bool) -> None:
        v, finished = self.verdict, event.finished
        length = not stopped and finished is not None and finished.reason == "length"
        self.finish_reason = "length" if length else "stop"
        fell_back = v.served_by != v.adapter
        # after a fallback the base answered: only the prompt was read on the adapter's experts
        v.coverage = finished.coverage if finished is not None and not fell_back else None
        self.monitor.record(
            v.adapter,
            v.coverage or v.prompt_coverage,
            prompt_tokens=len(self.request.prompt),
            completion_tokens=len(self.tokens),
            latency_s=time.monotonic() - self._started,
            flagged=v.flagged,
            fallback=fell_back,
        )

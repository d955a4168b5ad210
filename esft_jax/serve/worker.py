"""The engine's worker thread: continuous batching for a server whose requests arrive from other
threads.

One worker thread owns the Engine (serve/engine.py; which queued requests join a step:
serve/admission.py). It takes new requests and cancellations from a queue between steps, runs
`Engine.step` while any request is queued or live, and hands each event to its request's sink as it
happens (a token, then the finish; or the exception that failed it), so a client can stream every
token the step it is chosen. When nothing is live the worker sleeps on
the queue.

Why continuous rather than batches of a short window: a request joins the running decode at the
next step instead of waiting for the batch before it to finish, and a request that ends (EOS,
max_tokens, a stop string its client saw, a disconnect) frees its row for the next one at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from esft_jax.serve.engine import Engine, Event, Request

Sink = Callable[[Event | Exception], None]  # called on the worker thread: keep it short
_CLOSE = object()


class Ticket:
    """A submitted request: `cancel()` drops it (its row is free at the next step)."""

    def __init__(self, worker: Worker):
        self._worker = worker
        self.id: int | None = None  # the engine's id, once the worker has taken the request

    def cancel(self) -> None:
        self._worker._inbox.put(("cancel", self, None))


class Worker:
    """Runs `engine` on one worker thread; `submit` and `Ticket.cancel` may be called from any."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[int, Sink] = {}
        self._thread = threading.Thread(target=self._run, name="esft-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, sink: Sink) -> Ticket:
        """Queue a request (Engine.check it first: a refused one is given to `sink` as its
        exception); `sink` gets each of its events, or the exception that failed it."""
        ticket = Ticket(self)
        self._inbox.put(("submit", ticket, (request, sink)))
        return ticket

    def close(self) -> None:
        """Stop the worker after the requests already live have finished."""
        self._inbox.put((_CLOSE, None, None))
        self._thread.join()

    def _take(self, block: bool) -> bool:
        """Apply what the inbox holds (waiting for one item if `block`); False once closed."""
        while True:
            try:
                kind, ticket, payload = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind is _CLOSE:
                return False
            if kind == "submit":
                request, sink = payload
                try:
                    ticket.id = self.engine.submit(request)
                except (KeyError, ValueError) as e:
                    sink(e)
                    continue
                self._sinks[ticket.id] = sink
            elif ticket.id is not None and self._sinks.pop(ticket.id, None) is not None:
                self.engine.cancel(ticket.id)

    def _run(self) -> None:
        open_ = True
        while open_ or self.engine.busy:
            if open_:
                open_ = self._take(block=not self.engine.busy)
            if not self.engine.busy:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # pinned on no request: all live ones fail, the worker goes on
                for sink in self._sinks.values():
                    sink(e)
                self._sinks.clear()
                self.engine.clear()
                continue
            for event in events:
                sink = self._sinks.get(event.id)
                if sink is not None:
                    sink(event if event.error is None else event.error)
                if event.finished is not None or event.error is not None:
                    self._sinks.pop(event.id, None)

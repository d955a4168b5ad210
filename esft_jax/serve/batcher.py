"""Short-window batching: requests that arrive within a few milliseconds of each other share one
`Engine.generate` call, whatever adapters they name.

Why short-window and not continuous batching: `Engine.generate` runs a whole generation (prefill,
then the decode loop to the longest request's max_tokens or EOS) as one compiled program, so a
batch is fixed once it starts and a request that arrives meanwhile waits for the next batch.
Continuous batching (requests joining and leaving a running decode at every step) needs a
step-level decode API over a shared KV cache, a later increment.

A worker thread takes the first queued request, waits up to `window_s` for more (or until
`max_batch` are queued), runs the batch and resolves each request's future. A future cancelled
before its batch starts (the client went away) is dropped from the batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from esft_jax.serve.engine import Request

Generate = Callable[[Sequence[Request]], list[list[int]]]  # Engine.generate
_CLOSE = None  # the queue's sentinel: the worker stops


class Batcher:
    """Queues requests for `generate` (Engine.generate) and runs them in batches on one thread."""

    def __init__(self, generate: Generate, *, max_batch: int = 8, window_s: float = 0.01):
        self._generate, self.max_batch, self.window_s = generate, max_batch, window_s
        self._queue: queue.SimpleQueue[tuple[Request, Future] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="esft-batcher", daemon=True)
        self._worker.start()

    def submit(self, request: Request) -> Future:
        """A future of the request's generated token ids; cancel it to drop a request not yet started."""
        future: Future = Future()
        self._queue.put((request, future))
        return future

    def close(self) -> None:
        """Stop the worker after the batches already queued."""
        self._queue.put(_CLOSE)
        self._worker.join()

    def _next_batch(self) -> tuple[list[tuple[Request, Future]], bool]:
        """(the queued requests of one window, whether the batcher was closed meanwhile)."""
        first = self._queue.get()
        if first is _CLOSE:
            return [], True
        batch, deadline = [first], time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is _CLOSE:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        closed = False
        while not closed:
            batch, closed = self._next_batch()
            live = [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                outs = self._generate([r for r, _ in live])
            except Exception as e:  # the batch's requests fail; the worker keeps serving
                for _, future in live:
                    future.set_exception(e)
                continue
            for (_, future), out in zip(live, outs):
                future.set_result(out)

"""Continuous batching over one base model and any mix of its adapters: requests join and leave a
running decode at every step (serve/batch.py holds the device state).

Every request names its model (an adapter of the bank, or None for the base). `submit` queues it;
each `step` first prefills the queued requests that admission takes (serve/admission.py: as many as
there are free rows) together in one call, then decodes one token for every live row, and reports
each new token and each finished request. A request leaves at EOS (any of the model's EOS ids), at
its max_tokens, or when cancelled, and its row is free for the next step's joiners. Rows and
prefill groups are rounded up to powers of two and prompts to a bucket, so a few compilations serve
every mix; a request gets exactly the tokens it gets alone.

A failure fails only the requests it concerns (an event with its `error` each): a prefill group that
fails is retried one request at a time, and a decode that fails with newly joined rows is retried
without them. Only a decode that fails without new rows raises (every live request is then lost).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from esft_jax import sharding
from esft_jax.eval.generate import padded_rows
from esft_jax.eval.sampling import sampling_for
from esft_jax.model.config import ModelConfig
from esft_jax.model.params import Params
from esft_jax.serve import batch
from esft_jax.serve.admission import admit
from esft_jax.serve.bank import BASE, AdapterBank, build_bank
from esft_jax.serve.monitor import Coverage, coverage, trained_experts


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: Sequence[int]  # token ids, BOS included where the model has one
    model: str | None = None  # an adapter's name; None: the base model
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


class Finished(NamedTuple):
    tokens: list[int]  # the continuation, EOS excluded
    reason: str  # "stop" (EOS), "length" (max_tokens) or "cancelled"
    coverage: Coverage  # over the tokens the model read (prompt and all but the last output)


class Event(NamedTuple):
    id: int  # the request's, from submit
    token: int | None  # a new token (None when the event only finishes the request)
    finished: Finished | None  # set on the request's last event
    prompt_coverage: Coverage | None = None  # set on its first event: the prompt's coverage
    error: Exception | None = None  # set (alone) where the request failed: it has left the engine


@dataclasses.dataclass
class _Live:
    id: int
    request: Request
    tokens: list[int]


class Engine:
    """One base model (`params`, on `mesh` if given), the adapters `adapters` (name -> directory),
    `rows` concurrent requests of at most `max_len` tokens each (default: the model's context)."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        adapters: Mapping[str, str | Path],
        *,
        mesh: Mesh | None = None,
        rows: int = 8,
        max_len: int | None = None,
        bucket: int = 64,
    ):
        self.cfg, self.params, self.mesh, self.bucket = cfg, params, mesh, bucket
        self.bank: AdapterBank = build_bank(cfg, params, adapters)
        self._served = self.bank.with_overrides(params)
        self.rows = padded_rows(_power_of_two(rows), cfg, mesh)
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.stop_ids = frozenset(cfg.stop_token_ids)  # a request ends at any of them
        self._trained_ale = jnp.asarray(trained_experts(self.bank, cfg.n_routed_experts))
        self._queue: collections.deque[tuple[int, Request]] = collections.deque()
        self._live: dict[int, _Live] = {}  # row -> its request
        self._ids = itertools.count()
        self._batch: batch.Batch | None = None  # made on first use

    def check(self, request: Request) -> None:
        """ValueError for a request the engine cannot serve (KeyError for an unknown model)."""
        self.bank.index(request.model)
        if not request.prompt:
            raise ValueError("the prompt is empty")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if len(request.prompt) + request.max_tokens > self.max_len:
            raise ValueError(
                f"the prompt's {len(request.prompt)} tokens + max_tokens {request.max_tokens} "
                f"exceed the {self.max_len} tokens a request may hold"
            )
        if not 0 <= request.seed < 2**32:  # a PRNG key's seed (eval/sampling.py)
            raise ValueError(f"seed must lie in [0, 2^32), got {request.seed}")

    def submit(self, request: Request) -> int:
        """Queue a request (checked: see `check`); its id names it in `step`'s events."""
        self.check(request)
        rid = next(self._ids)
        self._queue.append((rid, request))
        return rid

    def cancel(self, rid: int) -> bool:
        """Drop a queued or live request (its row is free for the next step); False if unknown."""
        for item in self._queue:
            if item[0] == rid:
                self._queue.remove(item)
                return True
        row = next((row for row, live in self._live.items() if live.id == rid), None)
        return row is not None and self._live.pop(row) is not None

    def clear(self) -> None:
        """Drop every queued and live request and the device state (after a failed step)."""
        self._queue.clear()
        self._live.clear()
        self._batch = None

    @property
    def busy(self) -> bool:
        """Whether a request is queued or live."""
        return bool(self._queue or self._live)

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        return len(self._queue)

    @property
    def live(self) -> int:
        """Rows holding a request."""
        return len(self._live)

    def step(self) -> list[Event]:
        """Admit what fits, decode one token for every live request; the events. Raises only where
        a decode fails without newly joined rows."""
        with sharding.on_mesh(self.mesh):
            if self._batch is None:
                self._batch = batch.empty(self.cfg, self.rows, self.max_len)
            events, joined = self._admit()
            if self._live:
                events += self._decode(joined)
        return events

    def generate(self, requests: Sequence[Request]) -> list[list[int]]:
        """Each request's continuation (up to and excluding EOS, at most its max_tokens): greedy, or
        sampled with its temperature, top_p and seed; the same tokens whatever shares the batch."""
        return [f.tokens for f in self.run(requests)]

    def run(self, requests: Sequence[Request]) -> list[Finished]:
        """Submit the requests and step until all have finished (requests already queued or live
        are served alongside)."""
        ids = [self.submit(r) for r in requests]
        done: dict[int, Finished] = {}
        while not all(i in done for i in ids):
            for e in self.step():
                if e.error is not None:
                    raise e.error
                if e.finished is not None:
                    done[e.id] = e.finished
        return [done[i] for i in ids]

    def coverage(
        self, requests: Sequence[Request], outputs: Sequence[Sequence[int]]
    ) -> list[Coverage]:
        """Per request, the coverage of its prompt and output in one separate forward pass
        (serve/monitor.py; the reference of the live coverage in `Finished`)."""
        sets = [self.bank.index(r.model) for r in requests]
        sequences = [[*r.prompt, *out] for r, out in zip(requests, outputs)]
        return coverage(self.params, self.cfg, self.bank, sets, sequences, self.mesh)

    def _admit(self) -> tuple[list[Event], set[int]]:
        """Prefill the queued requests that admission takes, together; where that fails, one at a
        time, failing those that fail alone. (The events, the rows that joined.)"""
        free = sum(row not in self._live for row in range(self.rows))
        joining = [self._queue[i] for i in admit(free, [r for _, r in self._queue])]
        for item in joining:
            self._queue.remove(item)
        if not joining:
            return [], set()
        if len(joining) > 1:
            try:
                return self._join(joining)
            except Exception:  # one at a time instead: only the requests that fail alone fail
                pass
        events, joined = [], set()
        for rid, request in joining:
            try:
                got, rows = self._join([(rid, request)])
            except Exception as e:
                got, rows = [Event(rid, None, None, error=e)], set()
            events, joined = events + got, joined | rows
        return events, joined

    def _join(self, joining: list[tuple[int, Request]]) -> tuple[list[Event], set[int]]:
        """Prefill `joining` (no more than the free rows) together and insert them; the engine's
        state changes only once the prefill has succeeded."""
        free = [row for row in range(self.rows) if row not in self._live]
        n = len(joining)
        group = padded_rows(_power_of_two(n), self.cfg, self.mesh)
        longest = max(len(r.prompt) for _, r in joining)
        width = min(-(-longest // self.bucket) * self.bucket, self.max_len)
        tokens, segments = np.zeros((group, width), np.int32), np.zeros((group, width), np.int32)
        for i, (_, r) in enumerate(joining):  # right-padded: each row continues at its own length
            tokens[i, : len(r.prompt)], segments[i, : len(r.prompt)] = r.prompt, 1
        lengths = np.array([len(r.prompt) for _, r in joining] + [0] * (group - n), np.int32)
        sets = np.array([self.bank.index(r.model) for _, r in joining] + [BASE] * (group - n))
        settings = [(r.temperature, r.top_p, r.seed) for _, r in joining]
        sampling = sampling_for(*zip(*(settings + [(0.0, 1.0, 0)] * (group - n))))
        tokens_np, segments_np = sharding.place_rows((tokens, segments), self.mesh)
        new = batch.prefill(
            self._served,
            tokens_np,
            segments_np,
            jnp.asarray(lengths),
            sampling,
            self._trained_ale,
            jnp.asarray(sets, jnp.int32),
            self.cfg,
            self.max_len,
        )
        rows = np.array(free[:n] + [self.rows] * (group - n), np.int32)  # padding: dropped
        first = np.asarray(new.token_b)
        self._batch = batch.insert(self._batch, new, jnp.asarray(rows))
        for i, (rid, r) in enumerate(joining):
            self._live[int(rows[i])] = _Live(rid, r, [])
        prompt = self._coverage([int(row) for row in rows[:n]])
        events = self._emit({int(rows[i]): int(first[i]) for i in range(n)}, prompt)
        return events, {row for row in map(int, rows[:n]) if row in self._live}

    def _decode(self, joined: set[int]) -> list[Event]:
        """One token for every live row; where that fails, the rows that joined this step fail
        and the others are decoded again without them."""
        try:
            return self._decode_live()
        except Exception as e:
            if not joined:
                raise
            failed = [Event(self._live.pop(row).id, None, None, error=e) for row in sorted(joined)]
        return failed + (self._decode_live() if self._live else [])

    def _decode_live(self) -> list[Event]:
        sets = np.full(self.rows, BASE, np.int32)
        active = np.zeros(self.rows, bool)
        for row, live in self._live.items():
            sets[row], active[row] = self.bank.index(live.request.model), True
        self._batch = batch.step(
            self._served,
            self._batch,
            self._trained_ale,
            jnp.asarray(sets),
            jnp.asarray(active),
            self.cfg,
        )
        chosen = np.asarray(self._batch.token_b)
        return self._emit({row: int(chosen[row]) for row in sorted(self._live)})

    def _coverage(self, rows: Sequence[int]) -> dict[int, Coverage]:
        """The coverage so far of the requests in `rows` (the batch's live sums)."""
        hit_lb, mass_lb = np.asarray(self._batch.hit_lb), np.asarray(self._batch.mass_lb)
        return {row: Coverage.of(hit_lb[:, row], mass_lb[:, row]) for row in rows}

    def _emit(
        self, chosen: dict[int, int], prompt: dict[int, Coverage] | None = None
    ) -> list[Event]:
        """Events of each row's newly chosen token (the first ones with their prompt's coverage);
        rows whose request ends are freed."""
        prompt = prompt or {}
        events, ending = [], []
        for row, token in chosen.items():
            live = self._live[row]
            if token in self.stop_ids:
                ending.append((row, None, "stop"))
                continue
            live.tokens.append(token)
            if len(live.tokens) == live.request.max_tokens:
                ending.append((row, token, "length"))
            else:
                events.append(Event(live.id, token, None, prompt.get(row)))
        final = self._coverage([row for row, _, _ in ending]) if ending else {}
        for row, token, reason in ending:
            live = self._live.pop(row)
            finished = Finished(live.tokens, reason, final[row])
            events.append(Event(live.id, token, finished, prompt.get(row)))
        return events


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()

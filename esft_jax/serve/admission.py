"""Admission: which queued requests join the running batch at the next step.

A pure function of the free rows and the queue, so a policy is tested without a model and changed
in one place. Today: first come, first served, as many as there are free rows. The place for what
a busier server needs: a cap on the adapters one batch mixes (each adds an override set's experts
to the step), or a prefill token budget (a long prompt's prefill pauses every live row's decode for
a step: serve/engine.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine calls admit
    from esft_jax.serve.engine import Request


def admit(free_rows: int, queued: Sequence[Request]) -> list[int]:
    """The indices into `queued` (oldest first) of the requests to prefill now, ascending: at most
    `free_rows` of them."""
    return list(range(min(free_rows, len(queued))))

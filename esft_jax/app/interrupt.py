"""Ctrl-C: one line saying where it struck and how to go on, exit code 130 (128 + SIGINT), no
traceback.

A long command wraps its work in `explained(message)`: a KeyboardInterrupt inside becomes
Interrupted(message()), which the CLI prints as `esft <command>: <message>`; a KeyboardInterrupt
anywhere else prints `esft <command>: interrupted`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

EXIT_CODE = 130  # what a shell reports for a command that SIGINT stopped


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message saying where it struck and how to go on."""


@contextlib.contextmanager
def explained(message: Callable[[], str]) -> Iterator[None]:
    """Re-raise a KeyboardInterrupt inside as Interrupted(message()), message() asked at that time."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(message()) from None


def line(error: KeyboardInterrupt) -> str:
    """What to print for `error`: an Interrupted's message, else "interrupted"."""
    return str(error) if isinstance(error, Interrupted) else "interrupted"

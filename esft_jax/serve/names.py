"""The names a server answers to: requests' `model`. The base model is served under its checkpoint
directory's name (app/commands/serve.py base_name), each adapter under the name it was given
(`--config.adapters.NAME=DIR`).

They are checked with the config, before any model loads: an adapter named like the base would
shadow it, and a name clients cannot send plainly (empty, spaces, slashes) would be unreachable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")


def problem(base: str, adapter: str) -> str | None:
    """What is wrong with serving an adapter as `adapter` beside the base named `base`; None: nothing."""
    if adapter == base:
        return f"is the base model's name ({base}, its checkpoint directory's): name it otherwise"
    if not ADAPTER_NAME.fullmatch(adapter):
        return "an adapter's name is letters, digits and _ . : - (not starting with . : -)"
    return None


def check(base: str, adapters: Iterable[str]) -> None:
    """ValueError naming the first adapter that cannot be served under its name."""
    for name in adapters:
        if (why := problem(base, name)) is not None:
            raise ValueError(f"adapter {name!r}: {why}")

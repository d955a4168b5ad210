"""Reading a JSON file with errors that name the file (and the line of a syntax error)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path, error: type[Exception], missing: str) -> Any:
    """Parse `path`; raise `error` with '<path>: <missing>' or '<path>:<line>: not valid JSON'."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None

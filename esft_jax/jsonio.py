"""Reading a text or JSON file a user gave, with errors that name the file, the line and the column
(of a byte that is not UTF-8, or of a JSON syntax error)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

BOM = "\ufeff"


class NotUtf8(ValueError):
    """Bytes that are not UTF-8; `line` (from 1) holds the first bad byte, the message its column:
    'not UTF-8 (byte 0xe9 at column 14)'."""

    def __init__(self, data: bytes, error: UnicodeDecodeError):
        line_start = data.rfind(b"\n", 0, error.start) + 1
        self.line = data.count(b"\n", 0, line_start) + 1
        column = error.start - line_start + 1
        super().__init__(f"not UTF-8 (byte 0x{data[error.start]:02x} at column {column})")


def utf8(data: bytes) -> str:
    """`data` as UTF-8 text; NotUtf8 naming the first byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUtf8(data, e) from None


def read_text(path: str | Path, error: Callable[[str], Exception], missing: str) -> str:
    """The UTF-8 text of `path` (a BOM dropped); raise `error` with '<path>: <missing>' or
    '<path>:<line>: not UTF-8 (byte 0xe9 at column 14)'."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return utf8(path.read_bytes()).removeprefix(BOM)
    except NotUtf8 as e:
        raise error(f"{path}:{e.line}: {e}") from None


def read_json(path: str | Path, error: Callable[[str], Exception], missing: str) -> Any:
    """Parse `path`; raise `error` as read_text does, or with '<path>:<line>: not valid JSON (<why>,
    column <column>)'."""
    text = read_text(path, error, missing)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None

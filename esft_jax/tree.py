"""Nested-dict pytrees addressed by key paths, e.g. ("moe_layers", "moe", "experts", "gate")."""

from __future__ import annotations

from typing import Any

Path = tuple[str, ...]


def get_path(tree: dict, path: Path) -> Any:
    """The value at `path` (KeyError if any key is missing)."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
    """Put `value` at `path` in place, creating the missing dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value

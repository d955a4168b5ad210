"""Routing statistics from wherever they were written: our stats.npz (or the profile directory
holding it), or a directory of official ESFT logs."""

from __future__ import annotations

from pathlib import Path

from esft_jax.data.records import DataError
from esft_jax.routing.official_logs import read_official_logs
from esft_jax.routing.stats import RoutingStats

STATS_FILE = "stats.npz"


def load_stats(path: str | Path, top_k: int = 6, num_experts: int = 64) -> RoutingStats:
    """top_k / num_experts describe official logs only (which do not record them)."""
    path = Path(path)
    if path.is_dir() and (path / STATS_FILE).is_file():
        path = path / STATS_FILE
    if path.is_file():
        try:
            return RoutingStats.load(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a routing stats file ({e})") from None
    if path.is_dir():
        return read_official_logs(path, top_k, num_experts)
    raise DataError(f"{path}: no such stats file or log directory")

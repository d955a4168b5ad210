"""The official ESFT routing-log format, read and written for interoperability.

A directory holds `expert_weights_<layer>.txt` per MoE layer (model layer numbers). Line i of every
file is sequence i (one forward pass): the top-k expert ids of each of its tokens, flattened and
tab separated, then an empty field (two tabs), then the matching gate weights rounded to 4 decimals.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TextIO

import numpy as np

from esft_jax.data.records import DataError
from esft_jax.jsonio import read_text
from esft_jax.routing.stats import RoutingStats

_FILE = re.compile(r"expert_weights_(\d+)\.txt$")


def _parse_line(
    text: str, where: str, top_k: int, num_experts: int
) -> tuple[np.ndarray, np.ndarray]:
    ids_part, sep, weights_part = text.rstrip("\n").partition("\t\t")
    if not sep:
        raise DataError(
            f"{where}: expected expert ids, an empty field, then gate weights (tab separated)"
        )
    try:
        ids = np.array(ids_part.split("\t"), np.int64)
        weights = np.array(weights_part.strip("\t").split("\t"), np.float64)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if ids.size != weights.size:
        raise DataError(f"{where}: {ids.size} expert ids but {weights.size} gate weights")
    if ids.size % top_k:
        raise DataError(f"{where}: {ids.size} expert ids is not a multiple of top_k={top_k}")
    if ids.min() < 0 or ids.max() >= num_experts:
        raise DataError(
            f"{where}: expert id {ids.max() if ids.max() >= num_experts else ids.min()} "
            f"out of range [0, {num_experts})"
        )
    ids_tk = ids.reshape(-1, top_k)
    if (np.sort(ids_tk, 1)[:, 1:] == np.sort(ids_tk, 1)[:, :-1]).any():
        raise DataError(f"{where}: an expert appears twice in one token's top-{top_k}")
    return ids_tk, weights.reshape(-1, top_k)


def read_layer_log(
    path: str | Path, top_k: int = 6, num_experts: int = 64
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One `expert_weights_<layer>.txt`: per sequence, (expert ids [T, k], gate weights [T, k])."""
    lines = read_text(path, DataError, "no such file").splitlines()
    return [
        _parse_line(ln, f"{path}:{i}", top_k, num_experts)
        for i, ln in enumerate(lines, 1)
        if ln.strip()
    ]


def read_official_logs(log_dir: str | Path, top_k: int = 6, num_experts: int = 64) -> RoutingStats:
    """RoutingStats from an official log directory (DeepSeek-V2-Lite: top_k 6, 64 experts)."""
    log_dir = Path(log_dir)
    files = sorted(
        (
            (int(m.group(1)), p)
            for p in log_dir.glob("expert_weights_*.txt")
            if (m := _FILE.search(p.name))
        ),
        key=lambda x: x[0],
    )
    if not files:
        raise DataError(f"{log_dir}: no expert_weights_<layer>.txt files")
    per_layer = []  # per layer: list over sequences of (ids [n, k], weights [n, k])
    for _layer, path in files:
        per_layer.append(read_layer_log(path, top_k, num_experts))
    n_seq = len(per_layer[0])
    for (_layer, path), seqs in zip(files, per_layer):
        if len(seqs) != n_seq:
            raise DataError(f"{path}: {len(seqs)} sequences, but {files[0][1].name} has {n_seq}")
        for i, (ids, _) in enumerate(seqs):
            if ids.shape[0] != per_layer[0][i][0].shape[0]:
                raise DataError(
                    f"{path}:{i + 1}: {ids.shape[0]} tokens, but {files[0][1].name} has "
                    f"{per_layer[0][i][0].shape[0]} on that line"
                )
    layers = [layer for layer, _ in files]
    stats = RoutingStats.empty(layers, num_experts, top_k)
    for s in range(n_seq):
        counts = np.zeros((1, len(layers), num_experts), np.int64)
        gates = np.zeros((1, len(layers), num_experts))
        coact = np.zeros((len(layers), num_experts, num_experts), np.int64)
        for li, seqs in enumerate(per_layer):
            ids, weights = seqs[s]
            np.add.at(counts[0, li], ids.reshape(-1), 1)
            np.add.at(gates[0, li], ids.reshape(-1), weights.reshape(-1))
            hot = np.zeros((ids.shape[0], num_experts), np.int64)
            np.put_along_axis(hot, ids, 1, axis=1)
            coact[li] = hot.T @ hot
        stats.add(counts, gates, np.array([per_layer[0][s][0].shape[0]]), coact)
    return stats


class OfficialLogWriter:
    """Append sequences to an official log directory, one line per sequence in every layer file."""

    def __init__(self, log_dir: str | Path, layers: list[int]):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self._files: list[TextIO] = [
            open(Path(log_dir) / f"expert_weights_{layer}.txt", "w") for layer in layers
        ]

    def add(self, ids_ltk: np.ndarray, weights_ltk: np.ndarray) -> None:
        """One sequence: per layer, its tokens' top-k ids and gate weights [L, n, k]."""
        for f, ids, weights in zip(self._files, ids_ltk, weights_ltk):
            f.write(
                "\t".join(map(str, ids.reshape(-1).tolist()))
                + "\t\t"
                + "\t".join(repr(round(w, 4)) for w in weights.reshape(-1).tolist())
                + "\n"
            )

    def close(self) -> None:
        for f in self._files:
            f.close()

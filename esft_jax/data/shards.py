"""Data shards: which rows of each global batch a process loads, and from which samples.

The global batch of B rows is `count` equal shards side by side. Shard i is its own packed stream over
the training samples i, i + count, i + 2 count, ... (see pipeline.train_batches). In a multi-process run a
process loads only the shards under the batch rows its devices hold; processes whose devices hold the
same rows (the batch replicated across them) load the same shards. Fixing `count` fixes the data: one
process loading both shards of count=2 sees the same global batches as two processes loading one each,
and a run can resume on another number of processes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from esft_jax.data.pipeline import Batch
from esft_jax.errors import UserError


class ShardError(UserError, ValueError):
    """The batch rows cannot be split into the requested shards."""


def process_rows(rows_sharding: Sharding | None, batch_rows: int) -> dict[int, tuple[int, int]]:
    """process index -> the [start, stop) of the batch rows its devices hold (`rows_sharding`: of a
    [B, T] batch; None: one process holding every row)."""
    if rows_sharding is None:
        return {jax.process_index(): (0, batch_rows)}
    held: dict[int, set[int]] = {}
    for device, index in rows_sharding.devices_indices_map((batch_rows, 1)).items():
        held.setdefault(device.process_index, set()).update(range(batch_rows)[index[0]])
    ranges = {}
    for process, rows in held.items():
        start, stop = min(rows), max(rows) + 1
        if len(rows) != stop - start:
            raise ShardError(
                f"process {process} holds batch rows {sorted(rows)}, not one contiguous block"
            )
        ranges[process] = (start, stop)
    return ranges


@dataclasses.dataclass(frozen=True)
class DataShards:
    count: int  # shards in the global batch
    local: range  # the ones this process loads, in row order
    rows: int  # rows per shard


def plan(
    rows_sharding: Sharding | None,
    batch_rows: int,
    count: int = 0,
    key: str = "--config.data.shards",
) -> DataShards:
    """This process's shards of a global batch of `batch_rows` rows cut into `count` shards
    (0: one per distinct block of rows that a process holds); errors name the config `key`."""
    rows = process_rows(rows_sharding, batch_rows)
    blocks = sorted(set(rows.values()))
    count = count or len(blocks)
    if batch_rows % count:
        raise ShardError(f"batch_size={batch_rows} is not a multiple of {key}={count}")
    per = batch_rows // count
    if any(start % per or stop % per for start, stop in blocks):
        raise ShardError(
            f"{key}={count} ({per} rows each) does not fit the processes' blocks of rows "
            f"{blocks}; use a multiple of {len(blocks)} that divides batch_size={batch_rows}"
        )
    mine = rows.get(jax.process_index())
    if mine is None:
        raise ShardError(
            f"process {jax.process_index()} holds no device of the mesh; the mesh must span "
            "every process's devices"
        )
    start, stop = mine
    return DataShards(count, range(start // per, stop // per), per)


class LocalBatches:
    """This process's rows of every global batch: its shards' streams side by side."""

    def __init__(self, shards: DataShards, stream: Callable[[int, int], Iterator[Batch]]):
        """stream(index, count): shard `index`'s endless, resumable iterator of [rows, T] batches."""
        self.shards = shards
        self._streams = {i: stream(i, shards.count) for i in shards.local}

    def take(self, n: int) -> Batch:
        """The next n batches of this process's rows, stacked: [n, len(local) * rows, T]."""
        parts = [[next(s) for _ in range(n)] for s in self._streams.values()]
        return {
            k: np.stack([np.concatenate([p[j][k] for p in parts]) for j in range(n)])
            for k in parts[0][0]
        }

    def get_state(self) -> dict[str, Any]:
        """Every shard's stream position, gathered from all processes (a collective when there are
        several: every process calls it at the same step)."""
        local = {str(i): s.get_state() for i, s in self._streams.items()}
        return {"count": self.shards.count, "streams": _gather(local)}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("count") != self.shards.count:
            raise ShardError(
                f"the checkpoint's data position is for --config.data.shards={state.get('count')}, "
                f"this run has {self.shards.count}; resume with that count"
            )
        missing = [i for i in self._streams if str(i) not in state["streams"]]
        if missing:
            raise ShardError(f"the checkpoint's data position lacks shards {missing}")
        for i, stream in self._streams.items():
            stream.set_state(state["streams"][str(i)])


def global_max(value: int) -> int:
    """The largest of every process's `value` (all processes call this together)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.process_allgather(np.array([value])).max())


def _gather(local: dict[str, Any]) -> dict[str, Any]:
    """The union of every process's dict (all processes call this together)."""
    if jax.process_count() == 1:
        return local
    text = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([text.size]))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: text.size] = text
    everyone = multihost_utils.process_allgather(padded)
    merged: dict[str, Any] = {}
    for row, size in zip(everyone, sizes.ravel()):
        merged.update(json.loads(bytes(row[:size]).decode()))
    return merged

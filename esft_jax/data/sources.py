"""Datasets where people keep them, read lazily: jsonl, json, parquet, arrow, `datasets` folders.

`read_rows(path, parse, ...)` checks every row once, streaming, up front (a bad row raises DataError
naming file and line, `d.jsonl:17`, or file and row, `d.parquet:row 17` counted from 0 as `ds[17]`,
or is skipped and counted with skip_invalid), and returns `Rows`: a random-access sequence (len +
getitem, what grain's MapDataset.source reads) that reads and parses a row again when it is asked
for. Memory holds an index of the kept rows (byte offsets, row numbers), never the dataset:
- jsonl (.jsonl, .ndjson): a row per non-blank line; .json: a JSON array of rows, or JSON lines;
- parquet (.parquet, or a folder of .parquet shards in name order): read by row group, the last few
  decoded kept (random access decodes the row group holding the row: small row groups read fastest);
- arrow: a `datasets` save_to_disk folder (its state.json names the files), its DatasetDict folder
  (the "train" split; name the split's folder, `dir/test`, for another), or .arrow files:
  memory-mapped, nothing copied.
`format` ("auto": by extension or folder layout) names the container; each row's layout (messages,
ShareGPT, Alpaca, prompt/completion, text) is converted by data/canonical.py.
"""

from __future__ import annotations

import json
import os
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esft_jax.data.canonical import canonical, without_nulls
from esft_jax.data.records import DataError, Sample, _sample
from esft_jax.jsonio import utf8

T = TypeVar("T")
FORMATS = ("auto", "jsonl", "json", "parquet", "arrow")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
# the column sets a training table needs one of (data/canonical.py converts the first three)
ROW_COLUMNS = (
    ("messages",),
    ("conversations",),
    ("instruction", "output"),
    ("prompt", "completion"),
    ("text",),
)
_BOM = b"\xef\xbb\xbf"
_BLANK = re.compile(r"[ \t\n\r]*")
_CHUNK = 1 << 20  # bytes read at a time when scanning a JSON array
_BATCH = 1024  # table rows converted to Python at a time when scanning
_CACHED_CHUNKS = 4  # decoded row groups kept for random access


def _json(payload: bytes) -> Any:
    """One row's JSON (a line, or an array's element); ValueError naming the column of its error
    (the line's end dropped first: a row cut short is at its end, not at column 1 of a next line)."""
    try:
        return json.loads(utf8(payload).rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg}, column {e.colno})") from None


class _JsonFile:
    """Rows that are byte spans of one file (JSON lines or a JSON array's elements), read with pread
    (thread-safe: grain reads from several threads)."""

    def __init__(self, path: Path, lines: bool):
        self.path, self._lines = path, lines
        self._file = path.open("rb", buffering=0)
        self._starts, self._ends, self._labels = array("q"), array("q"), array("q")

    def _read(self, start: int, end: int) -> bytes:
        return os.pread(self._file.fileno(), end - start, start)

    def _label(self, label: int) -> str:
        return f"{self.path}:{label}" if self._lines else f"{self.path}:row {label}"

    def scan(self) -> Iterator[tuple[str, bytes]]:
        """Every row in order, as (label, bytes), recording where each is."""
        with self.path.open("rb") as f:
            spans = _line_spans(f) if self._lines else _array_spans(f)
            for label, (start, end) in spans:
                self._starts.append(start)
                self._ends.append(end)
                self._labels.append(label)
                yield self._label(label), self._read(start, end)

    def __getitem__(self, i: int) -> tuple[str, bytes]:
        return self._label(self._labels[i]), self._read(self._starts[i], self._ends[i])

    decode = staticmethod(_json)


def _line_spans(f: BinaryIO) -> Iterator[tuple[int, tuple[int, int]]]:
    """(line number, (start, end)) of each non-blank line."""
    offset = 0
    for lineno, line in enumerate(f, 1):
        start, offset = offset, offset + len(line)
        if lineno == 1 and line.startswith(_BOM):
            start += len(_BOM)
        if line.strip():
            yield lineno, (start, offset)


def _array_spans(f: BinaryIO) -> Iterator[tuple[int, tuple[int, int]]]:
    """(element index, (start, end)) of each element of the JSON array in `f`, read a chunk at a
    time. The bytes are decoded as latin-1 (one character per byte, JSON's syntax is ASCII), so
    string positions are byte offsets; each element is decoded as UTF-8 when it is read."""
    decoder = json.JSONDecoder()
    buf, base, pos, eof = "", 0, 0, False  # buf: the file's bytes [base, base + len(buf))

    def refill() -> None:
        nonlocal buf, base, pos, eof
        chunk = f.read(max(_CHUNK, len(buf)))  # doubling: a long element takes few retries
        eof = not chunk
        buf, base, pos = buf[pos:] + chunk.decode("latin-1"), base + pos, 0

    def peek() -> str:  # the next non-blank character ("" at the end), pos on it
        nonlocal pos
        while True:
            pos = _BLANK.match(buf, pos).end()
            if pos < len(buf) or eof:
                return buf[pos : pos + 1]
            refill()

    refill()
    if buf.startswith(_BOM.decode("latin-1")):
        pos = len(_BOM)
    if peek() != "[":
        raise DataError(f"{f.name}: not a JSON array")
    pos += 1
    index = 0
    while peek() != "]":
        while True:
            try:
                end = decoder.raw_decode(buf, pos)[1]
                if end < len(buf) or eof:  # a number or literal may go on in the next chunk
                    break
            except json.JSONDecodeError as e:
                if eof:
                    raise DataError(
                        f"{f.name}:row {index}: not valid JSON ({e.msg}, byte {base + e.pos})"
                    ) from None
            refill()
        yield index, (base + pos, base + end)
        pos, index = end, index + 1
        after = peek()
        if after == ",":
            pos += 1
        elif after != "]":
            raise DataError(f"{f.name}:row {index}: expected ',' or ']' at byte {base + pos}")


class _ParquetFile:
    def __init__(self, path: Path):
        self.path = path
        self._file = pq.ParquetFile(path, memory_map=True)
        self.names = self._file.schema_arrow.names
        meta = self._file.metadata
        self.chunk_rows = [meta.row_group(k).num_rows for k in range(meta.num_row_groups)]

    def chunk(self, k: int) -> pa.Table:
        return self._file.read_row_group(k)


class _ArrowFile:
    """An Arrow IPC file or stream (what `datasets` writes), memory-mapped: its record batches point
    into the map, nothing is copied."""

    def __init__(self, path: Path):
        self.path = path
        source = pa.memory_map(str(path))
        try:
            table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_stream(source).read_all()
        self.names = table.schema.names
        self._batches = table.to_batches()
        self.chunk_rows = [b.num_rows for b in self._batches]

    def chunk(self, k: int) -> pa.RecordBatch:
        return self._batches[k]


class _Tables:
    """The rows of one or more table files, read by the chunk (row group, record batch) holding
    them; decoded chunks are cached (a few, least recently used first out) under a lock."""

    def __init__(self, files: list[_ParquetFile | _ArrowFile]):
        self._chunks = [  # (file, chunk in the file, its first row in the file)
            (file, k, first)
            for file in files
            for k, first in enumerate(np.cumsum([0, *file.chunk_rows])[:-1].tolist())
        ]
        sizes = [file.chunk_rows[k] for file, k, _ in self._chunks]
        self._starts = np.cumsum([0, *sizes])[:-1]  # each chunk's first row
        self._cache: OrderedDict[int, pa.Table | pa.RecordBatch] = OrderedDict()
        self._lock = threading.Lock()

    def _chunk(self, c: int) -> pa.Table | pa.RecordBatch:
        with self._lock:
            if c not in self._cache:
                file, k, _ = self._chunks[c]
                self._cache[c] = file.chunk(k)
                if len(self._cache) > _CACHED_CHUNKS:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(c)
            return self._cache[c]

    def scan(self) -> Iterator[tuple[str, dict]]:
        for c, (file, _, first) in enumerate(self._chunks):
            table = self._chunk(c)
            for offset in range(0, table.num_rows, _BATCH):
                rows = table.slice(offset, _BATCH).to_pylist()
                for row_in_file, row in enumerate(rows, first + offset):
                    yield f"{file.path}:row {row_in_file}", row

    def __getitem__(self, i: int) -> tuple[str, dict]:
        c = int(np.searchsorted(self._starts, i, "right")) - 1
        file, _, first = self._chunks[c]
        local = i - int(self._starts[c])
        return f"{file.path}:row {first + local}", self._chunk(c).slice(local, 1).to_pylist()[0]

    decode = staticmethod(without_nulls)


def _folder(path: Path) -> tuple[str, list[Path]]:
    """(format, files) of a folder: a `datasets` Dataset or DatasetDict, or parquet/arrow shards."""
    if (path / "dataset_dict.json").is_file():
        splits = _datasets_json(path / "dataset_dict.json", "splits")
        if "train" not in splits:
            raise DataError(
                f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(splits)}); "
                f"name a split's folder, e.g. {path / splits[0]}"
            )
        path = path / "train"
    if (path / "state.json").is_file():
        return "arrow", [
            path / f["filename"] for f in _datasets_json(path / "state.json", "_data_files")
        ]
    for format in ("parquet", "arrow"):
        if files := sorted(path.glob(f"*.{format}")):
            return format, files
    raise DataError(
        f"{path}: is a directory with no .parquet or .arrow files, nor the state.json or "
        f"dataset_dict.json of a `datasets` save_to_disk folder"
    )


def _datasets_json(path: Path, key: str) -> list:
    """`key` of a `datasets` folder's JSON file (a list: splits, or data files)."""
    try:
        value = json.loads(path.read_text())[key]
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, str) or isinstance(v.get("filename"), str) for v in value)
        ):
            return value
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    raise DataError(f"{path}: not a `datasets` folder's {path.name} (no list {key!r})")


def _open(
    path: Path, format: str, what: str, columns: Sequence[Sequence[str]]
) -> _JsonFile | _Tables:
    """The source of `path` in `format` ("auto": by extension or folder layout)."""
    if format not in FORMATS:
        raise DataError(f"format={format!r}: expected one of {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"{path}: no such {what} file or directory")
    if path.is_dir():
        found, files = _folder(path)
        if format not in ("auto", found):
            raise DataError(f"{path}: a folder of {found} data, not {format}")
        format = found
    else:
        files = [path]
        if format == "auto":
            format = EXTENSIONS.get(path.suffix.lower(), "")
        if not format:
            raise DataError(
                f"{path}: unknown data format {path.suffix!r} (expected "
                f"{', '.join(EXTENSIONS)}, a parquet or `datasets` folder, or name the format: "
                f"{', '.join(FORMATS[1:])})"
            )
    if format in ("jsonl", "json"):
        return _JsonFile(path, lines=format == "jsonl" or not _starts_array(path))
    tables = []
    for file in files:
        try:
            table = _ParquetFile(file) if format == "parquet" else _ArrowFile(file)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file}: not a readable {format} file ({e})") from None
        if not any(set(names) <= set(table.names) for names in columns):
            raise DataError(
                f"{file}: expected columns {' | '.join('/'.join(c) for c in columns)}; "
                f"found: {', '.join(table.names)}"
            )
        tables.append(table)
    return _Tables(tables)


def _starts_array(path: Path) -> bool:
    """Whether a .json file holds one JSON array (else JSON lines)."""
    with path.open("rb") as f:
        head = f.read(_CHUNK).removeprefix(_BOM).lstrip()
    return head.startswith(b"[")


class Rows(Sequence[T], Generic[T]):
    """The kept rows of a source, each read and parsed again when asked for (`read_rows`)."""

    def __init__(
        self, source: _JsonFile | _Tables, keep: np.ndarray, parse: Callable[[Any, str], T]
    ):
        self._source, self._keep, self._parse = source, keep, parse

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        label, payload = self._source[int(self._keep[i])]
        return self._parse(canonical(self._source.decode(payload)), label)

    def subset(self, indices: Sequence[int]) -> Rows[T]:
        """The rows at `indices` (positions in this sequence), lazily too."""
        return Rows(self._source, self._keep[np.asarray(indices, np.int64)], self._parse)


def read_rows(
    path: str | Path,
    parse: Callable[[Any, str], T],
    *,
    what: str,
    format: str = "auto",
    skip_invalid: bool = False,
    limit: int = 0,
    columns: Sequence[Sequence[str]] = ROW_COLUMNS,
) -> tuple[Rows[T], int]:
    """(the rows parse(canonical row, "file:line" / "file:row N") accepts, the first `limit` of
    them if limit > 0; rows skipped). A row that is not JSON or UTF-8, or that the conversion or
    `parse` rejects with a ValueError, raises DataError naming file and line/row, or is skipped and
    counted when skip_invalid; so does a missing path, an unknown format, a table lacking every
    column set of `columns`, or a source without rows."""
    path = Path(path)
    source = _open(path, format, what, columns)
    keep, skipped = array("q"), 0
    try:
        for index, (label, payload) in enumerate(source.scan()):
            try:
                parse(canonical(source.decode(payload)), label)
            except ValueError as e:
                if not skip_invalid:
                    raise DataError(f"{label}: {e}") from None
                skipped += 1
                continue
            keep.append(index)
            if len(keep) == limit:
                break
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not keep:
        raise DataError(f"{path}: no samples ({'every row malformed' if skipped else 'no rows'})")
    return Rows(source, np.frombuffer(keep, np.int64), parse), skipped


def read_samples(
    path: str | Path, skip_invalid: bool = False, format: str = "auto"
) -> tuple[Rows[Sample], int]:
    """(samples, rows skipped) of a training dataset; errors and skip_invalid: `read_rows`."""
    return read_rows(path, _sample, what="dataset", format=format, skip_invalid=skip_invalid)

"""Datasets in every accepted format (data/sources.py, data/canonical.py), each written with its real
writer, read as the same samples as canonical jsonl; conversions, laziness, bad rows, data shards."""

import dataclasses
import json
import re
import tracemalloc

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esft_jax.app import config_files
from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.data.pipeline import train_batches
from esft_jax.data.records import DataError
from esft_jax.data.sources import read_rows, read_samples
from esft_jax.eval.metrics import read_eval_set


def _chat(user: str, assistant: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    }


ROWS = [_chat(f"question {i} é", f"answer {i}") for i in range(7)] + [{"text": "plain ü"}]


def _table_rows() -> list[dict]:
    """ROWS with every column in every row (null where a row lacks it), as tables hold them."""
    return [{"messages": r.get("messages"), "text": r.get("text")} for r in ROWS]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _parquet(path, rows, row_group_size: int = 3) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return str(path)


def _shards(d) -> str:
    d.mkdir()
    _parquet(d / "train-00000-of-00002.parquet", _table_rows()[:5])
    _parquet(d / "train-00001-of-00002.parquet", _table_rows()[5:])
    return str(d)


def _arrow_file(path) -> str:
    table = pa.Table.from_pylist(_table_rows())
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    return str(path)


def _saved(d) -> str:
    datasets.Dataset.from_list(_table_rows()).save_to_disk(str(d), num_shards=2)
    return str(d)


def _dataset_dict(d) -> str:
    other = datasets.Dataset.from_list([{"messages": None, "text": "test split"}])
    splits = {"train": datasets.Dataset.from_list(_table_rows()), "test": other}
    datasets.DatasetDict(splits).save_to_disk(str(d))
    return str(d)


WRITERS = {
    "json array": lambda t: _write_text(t / "d.json", json.dumps(ROWS, indent=1)),
    "json lines in .json": lambda t: _jsonl(t / "d.json", ROWS),
    "parquet": lambda t: _parquet(t / "d.parquet", _table_rows()),
    "parquet shards": lambda t: _shards(t / "shards"),
    "arrow file": lambda t: _arrow_file(t / "d.arrow"),
    "datasets folder": lambda t: _saved(t / "saved"),
    "DatasetDict folder": lambda t: _dataset_dict(t / "dict"),
}


def _write_text(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _unsourced(samples) -> list:
    return [dataclasses.replace(s, source="") for s in samples]


@pytest.mark.parametrize("kind", WRITERS)
def test_every_format_reads_as_canonical_jsonl(tmp_path, kind):
    expected, _ = read_samples(_jsonl(tmp_path / "canonical.jsonl", ROWS))
    samples, skipped = read_samples(WRITERS[kind](tmp_path))
    assert skipped == 0 and _unsourced(samples) == _unsourced(expected)


def test_sources_name_file_and_row_and_a_datasetdict_split_is_chosen(tmp_path):
    samples, _ = read_samples(_shards(tmp_path / "shards"))
    assert samples[6].source == f"{tmp_path}/shards/train-00001-of-00002.parquet:row 1"
    root = _dataset_dict(tmp_path / "dict")
    samples, _ = read_samples(f"{root}/test")  # another split: its folder
    assert [s.answer for s in samples] == ["test split"]
    named, _ = read_samples(_jsonl(tmp_path / "d.txt", ROWS), format="jsonl")  # any extension
    assert named[7].answer == "plain ü"


def _as_read(path):
    return list(read_rows(path, lambda row, source: row, what="dataset")[0])


SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "user", "value": "Weather?"},
        {"from": "observation", "value": "sunny"},
        {"from": "assistant", "value": "Sunny."},
    ],
    "system": "Be brief.",
    "tools": "[]",
}
SHAREGPT_MESSAGES = {
    "tools": "[]",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Weather?"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ],
}
ALPACA = [
    {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "Translator."},
    {"instruction": "Count to 2.", "input": "", "output": "1 2"},
]
ALPACA_MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "Translator."},
            {"role": "user", "content": "Translate.\nBonjour"},
            {"role": "assistant", "content": "Hello"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Count to 2."},
            {"role": "assistant", "content": "1 2"},
        ]
    },
]


def test_sharegpt_and_alpaca_become_messages(tmp_path):
    assert _as_read(_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT])) == [SHAREGPT_MESSAGES]
    assert _as_read(_parquet(tmp_path / "sharegpt.parquet", [SHAREGPT])) == [SHAREGPT_MESSAGES]
    assert _as_read(_jsonl(tmp_path / "alpaca.jsonl", ALPACA)) == ALPACA_MESSAGES
    assert _as_read(_parquet(tmp_path / "alpaca.parquet", ALPACA)) == ALPACA_MESSAGES
    pairs = [{"prompt": "p", "completion": "c"}, {"text": "t"}]  # passed on as they are
    assert _as_read(_parquet(tmp_path / "pairs.parquet", pairs[:1])) == pairs[:1]
    assert _as_read(_jsonl(tmp_path / "pairs.jsonl", pairs)) == pairs
    bad = dict(SHAREGPT, conversations=[{"from": "robot", "value": "x"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: conversations\[0\]: 'from' must be one of"):
        _as_read(_jsonl(tmp_path / "bad.jsonl", [bad]))


def test_rows_are_indexed_not_held_and_parsed_on_access(tmp_path):
    n = 20_000
    path = _jsonl(tmp_path / "big.jsonl", [_chat("q" * 200, f"a{i}") for i in range(n)])
    parsed = {"count": 0, "last": ""}

    def parse(row, source):
        parsed.update(count=parsed["count"] + 1, last=source)
        return row["messages"][1]["content"]

    tracemalloc.start()
    rows, _ = read_rows(path, parse, what="dataset")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = (tmp_path / "big.jsonl").stat().st_size
    assert size > 4_000_000 and peak < size / 8  # the index, not the rows
    assert parsed["count"] == n and len(rows) == n  # one checking pass
    assert rows[12_345] == "a12345" and rows[-1] == f"a{n - 1}"
    assert parsed == {"count": n + 2, "last": f"{path}:{n}"}  # read again when asked for


def test_datasets_folders_are_memory_mapped(tmp_path):
    rows = [{"text": "x" * 1000}] * 4000
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    before = pa.total_allocated_bytes()
    samples, _ = read_samples(tmp_path / "saved")
    assert samples[3999].answer == "x" * 1000
    assert pa.total_allocated_bytes() - before < 1_000_000  # 4 MB of text, none of it copied


def test_bad_parquet_rows_name_file_and_row_and_can_be_skipped(tmp_path):
    rows = _table_rows()
    rows[2] = {"messages": [{"role": "user", "content": "q"}], "text": None}
    rows[5] = {"messages": None, "text": None}
    path = _parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(DataError, match=r"d.parquet:row 2: 'messages' has no assistant message"):
        read_samples(path)
    samples, skipped = read_samples(path, skip_invalid=True)
    expected, _ = read_samples(
        _jsonl(tmp_path / "ok.jsonl", [r for i, r in enumerate(ROWS) if i not in (2, 5)])
    )
    assert skipped == 2 and _unsourced(samples) == _unsourced(expected)
    assert [s.source.rpartition(":")[2] for s in samples] == [
        f"row {i}" for i in (0, 1, 3, 4, 6, 7)
    ]


@pytest.mark.parametrize(
    "write, message",
    [
        (
            lambda t: _parquet(t / "d.parquet", [{"a": 1, "b": "x"}]),
            "d.parquet: expected columns messages | conversations | instruction/output | "
            "prompt/completion | text; found: a, b",
        ),
        (lambda t: _write_text(t / "d.csv", "text\nx\n"), "d.csv: unknown data format '.csv'"),
        (lambda t: str(t / "none.parquet"), "none.parquet: no such dataset file or directory"),
        (
            lambda t: _write_text(t / "d.parquet", "not parquet"),
            "d.parquet: not a readable parquet file",
        ),
        (
            lambda t: _write_bytes(t / "d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
            "d.jsonl:2: not UTF-8 (byte 0xe9 at column 14)",
        ),
        (
            lambda t: _write_text(t / "d.json", '[{"text": "a"}, {"text": }]'),
            "d.json:row 1: not valid JSON",
        ),
        (lambda t: _write_text(t / "d.json", "[]"), "d.json: no samples"),
        (
            lambda t: _dataset_dict_without_train(t / "dict"),
            "without a 'train' split (splits: test); name a split's folder",
        ),
        (
            lambda t: _write_text(t / "d.jsonl", '{"text": "ok"}\n{"text": 1\n{"text": "ok"}\n'),
            "d.jsonl:2: not valid JSON (Expecting ',' delimiter, column 11)",
        ),
        (
            lambda t: (t / "empty").mkdir() or str(t / "empty"),
            "empty: is a directory with no .parquet or .arrow files",
        ),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path, write, message):
    with pytest.raises(DataError, match=re.escape(message)):
        read_samples(write(tmp_path))


def _write_bytes(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _dataset_dict_without_train(d) -> str:
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS[-1:])}).save_to_disk(str(d))
    return str(d)


def test_eval_sets_in_parquet(tmp_path):
    rows = [{"prompt": f"p{i}", "answers": [f"a{i}"]} for i in range(3)]
    got = read_eval_set(_parquet(tmp_path / "eval.parquet", rows), limit=2)
    assert [(s.prompt, s.answers) for s in got] == [("p0", ["a0"]), ("p1", ["a1"])]
    with pytest.raises(
        DataError, match="expected columns prompt/answers \\| messages/answers; found: text"
    ):
        read_eval_set(_parquet(tmp_path / "text.parquet", [{"text": "x"}]))


def test_data_shards_of_lazy_rows_are_those_of_a_list(tmp_path):
    rows = [{"text": f"row {i:02d}"} for i in range(30)]
    rows[4] = {"text": None}  # skipped: the kept rows are not every row
    samples, skipped = read_samples(_parquet(tmp_path / "d.parquet", rows, 4), skip_invalid=True)
    held = list(samples)
    cfg = config_files.model_config(config_files.load_file("configs/models/tiny.py"))
    for shard in ((0, 2), (1, 2)):
        kw = dict(seq_len=32, batch_size=2, seed=3, shard=shard)
        lazy = iter(train_batches(samples, byte_tokenizer(), cfg, **kw))
        listed = iter(train_batches(held, byte_tokenizer(), cfg, **kw))
        for _ in range(8):
            a, b = next(lazy), next(listed)
            assert all(np.array_equal(a[k], b[k]) for k in a)
    part = samples.subset([5, 0, 28])
    assert skipped == 1 and list(part) == [held[5], held[0], held[28]]

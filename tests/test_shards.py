"""Data shards: which rows each process loads, shards partition the samples, and positions resume."""

import collections

import numpy as np
import pytest
import train_fixtures as fx

from esft_jax.app import cli, config_files
from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.data.pipeline import train_batches
from esft_jax.data.records import Sample
from esft_jax.data.shards import DataShards, LocalBatches, ShardError, plan, process_rows

CFG = config_files.model_config(config_files.load_file("configs/models/tiny.py"))
TOK = byte_tokenizer()
SAMPLES = [Sample(f"q{i:02d}\n", f"a{i:02d}", f"test:{i}") for i in range(24)]

_Device = collections.namedtuple("_Device", "process_index id")


class _FakeSharding:
    """A [B, T] batch's rows over processes: `blocks[p]` lists the row slices of process p's devices."""

    def __init__(self, blocks: list[list[slice]]):
        self.blocks = blocks

    def devices_indices_map(self, shape):
        return {
            _Device(p, i): (rows, slice(None))
            for p, slices in enumerate(self.blocks)
            for i, rows in enumerate(slices)
        }


def test_replicated_processes_load_the_same_shards():
    # 4 processes; the batch is split in two halves, each half replicated on two processes
    halves = _FakeSharding([[slice(0, 4)], [slice(0, 4)], [slice(4, 8)], [slice(4, 8)]])
    assert process_rows(halves, 8) == {0: (0, 4), 1: (0, 4), 2: (4, 8), 3: (4, 8)}
    assert plan(halves, 8) == DataShards(count=2, local=range(0, 1), rows=4)  # this is process 0
    assert plan(halves, 8, count=4) == DataShards(count=4, local=range(0, 2), rows=2)
    with pytest.raises(ShardError, match="does not fit"):
        # 4 rows each: 0-4, 4-8, 8-12
        plan(_FakeSharding([[slice(0, 6)]] * 2 + [[slice(6, 12)]] * 2), 12, count=3)
    with pytest.raises(ShardError, match="not a multiple"):
        plan(halves, 8, count=3)


def test_rows_must_form_one_block_per_process():
    split = _FakeSharding([[slice(0, 2), slice(4, 6)], [slice(2, 4), slice(6, 8)]])
    with pytest.raises(ShardError, match="contiguous"):
        plan(split, 8)


def test_one_process_holds_every_row():
    assert plan(None, 8) == DataShards(count=1, local=range(0, 1), rows=8)
    assert plan(None, 8, count=4) == DataShards(count=4, local=range(0, 4), rows=2)


def _stream(index, count):
    return iter(
        train_batches(SAMPLES, TOK, CFG, seq_len=48, batch_size=2, seed=0, shard=(index, count))
    )


def _answers(tokens_bt):
    text = "".join(TOK.decode(row.tolist()) for row in tokens_bt)
    return [
        int(text[i + 1 : i + 3])
        for i in range(len(text))
        if text[i] == "a" and text[i + 1 : i + 3].isdigit()
    ]


def test_shards_partition_the_samples_and_sit_side_by_side():
    data = LocalBatches(plan(None, 4, count=2), _stream)
    batches = [data.take(1) for _ in range(12)]
    assert batches[0]["tokens"].shape == (1, 4, 48)
    first, second = _stream(0, 2), _stream(1, 2)
    for b in batches[:3]:  # rows 0-1 are shard 0's stream, rows 2-3 shard 1's
        np.testing.assert_array_equal(
            b["tokens"][0], np.concatenate([next(first)["tokens"], next(second)["tokens"]])
        )
    top = [a for b in batches for a in _answers(b["tokens"][0, :2])]
    bottom = [a for b in batches for a in _answers(b["tokens"][0, 2:])]
    assert set(top) == set(range(0, 24, 2)) and set(bottom) == set(range(1, 24, 2))


def test_positions_resume_every_shard_and_name_a_changed_count():
    data = LocalBatches(plan(None, 4, count=2), _stream)
    data.take(3)
    state = data.get_state()
    expected = data.take(2)
    resumed = LocalBatches(plan(None, 4, count=2), _stream)
    resumed.set_state(state)
    got = resumed.take(2)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    with pytest.raises(ShardError, match="data.shards=2"):
        LocalBatches(plan(None, 4), _stream).set_state(state)


def test_train_names_a_shard_count_that_does_not_divide_the_batch(tmp_path, capsys):
    data = fx.task_dataset(tmp_path / "task.jsonl", n=8)
    args = [
        "train",
        "--config",
        "configs/train.py:fft",
        "--config.checkpoint=random",
        f"--config.data.train={data}",
        "--config.batch_size=4",
        "--config.data.shards=3",
        f"--config.workdir={tmp_path / 'run'}",
    ]
    assert cli.main(args) == 2
    assert "batch_size=4 is not a multiple of --config.data.shards=3" in capsys.readouterr().err

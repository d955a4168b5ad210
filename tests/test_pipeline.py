"""Training batches: packing with segments, the loss mask, shuffling, validation split, mixing."""

import itertools

import numpy as np

from esft_jax.app import config_files
from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.data.pipeline import eval_batches, split_validation, train_batches
from esft_jax.data.records import Sample

CFG = config_files.model_config(config_files.load_file("configs/models/tiny.py"))
TOK = byte_tokenizer()


def _samples(tag, n=20):
    return [
        Sample(f"User: {tag} q{i}\n\nAssistant:", f" {tag} a{i}", f"{tag}:{i}") for i in range(n)
    ]


def _take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def _docs(batch):
    """Decoded documents of a batch: (text, answer text) per segment."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            where = seg == s
            ids, loss = batch["tokens"][row][where], batch["loss_mask"][row][where]
            assert ids[0] == CFG.bos_token_id and ids[-1] == CFG.eos_token_id
            np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.sum()))
            out.append((TOK.decode(ids.tolist()), TOK.decode(ids[loss.astype(bool)].tolist())))
    return out


def test_rows_pack_whole_samples_with_answer_only_loss():
    batches = _take(train_batches(_samples("task"), TOK, CFG, seq_len=96, batch_size=2, seed=0), 3)
    assert batches[0]["tokens"].shape == (2, 96)
    docs = [d for b in batches for d in _docs(b)]
    assert len(docs) > 6  # several samples share each row
    for text, answer in docs:
        i = text.split(" q")[1].split("\n")[0]
        assert text == f"User: task q{i}\n\nAssistant: task a{i}" and answer == f" task a{i}"


def test_shuffling_is_seeded_and_every_epoch_differs():
    def order(seed, n=12):
        batches = _take(
            train_batches(_samples("t", 6), TOK, CFG, seq_len=40, batch_size=1, seed=seed), n
        )
        return [d[0].split(" q")[1].split("\n")[0] for b in batches for d in _docs(b)]

    a = order(0)
    assert a == order(0) and a != order(1)
    assert sorted(a[:6]) == [str(i) for i in range(6)]  # one epoch holds every sample once
    assert a[:6] != a[6:12]  # the next epoch is reshuffled


def test_general_data_is_mixed_at_the_ratio():
    it = iter(
        train_batches(
            _samples("task", 50),
            TOK,
            CFG,
            seq_len=128,
            batch_size=4,
            seed=0,
            general=_samples("general", 50),
            general_ratio=1.0,
        )
    )
    tags = [d[0].split(" ")[1] for b in _take(it, 10) for d in _docs(b)]
    share = tags.count("general") / len(tags)
    assert 0.4 <= share <= 0.6, share


def test_validation_split_and_eval_batches():
    samples = _samples("s", 40)
    train, val = split_validation(samples, 0.1, 100, seed=0)
    assert (
        len(val) == 4
        and len(train) == 36
        and not set(s.source for s in val) & set(s.source for s in train)
    )
    assert (
        split_validation(samples, 0.5, 3, seed=0)[1] == split_validation(samples, 0.5, 3, seed=0)[1]
    )
    assert len(split_validation(samples, 0.5, 3, seed=0)[1]) == 3
    batches = eval_batches(val, TOK, CFG, seq_len=64, batch_size=3)
    docs = [d for b in batches for d in _docs(b)]
    assert sorted(d[0] for d in docs) == sorted(
        TOK.decode([CFG.bos_token_id] + TOK.encode(s.prompt + s.answer).ids + [CFG.eos_token_id])
        for s in val
    )

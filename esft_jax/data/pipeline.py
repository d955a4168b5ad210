"""Training batches: tokenise, mix a general dataset in, pack to fixed length, batch (grain).

Each sample becomes one or more documents {"tokens", "loss"} (loss: 1 on trained tokens; a
conversation's assistant turns, its chat template's rendering: data/tokenize.py, data/chat.py; a
template that rewrites earlier turns makes a document per turn). Samples are shuffled with a seed
(reshuffled every epoch), optionally mixed with a second dataset at `general_ratio` general samples
per task sample (the paper mixes task and alignment data 1:1), packed first-fit into rows of
`seq_len` tokens with segment ids (no attention across samples), and batched. The iterator's
position is a small dict (`get_state` / `set_state`), saved with every checkpoint for exact resume.
"""

from __future__ import annotations

import grain
import numpy as np
from tokenizers import Tokenizer

from esft_jax.data.chat import ChatTemplate
from esft_jax.data.records import Sample
from esft_jax.data.tokenize import encode
from esft_jax.model.config import ModelConfig

Batch = dict[str, np.ndarray]  # tokens, segment_ids, positions, loss_mask: [B, T]


def split_validation(
    samples: list[Sample], fraction: float, max_samples: int, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): a seeded random `fraction` of the samples (at most max_samples) held out."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = min(int(round(fraction * len(samples))), max_samples)
    held = set(order[:n_val].tolist())
    return ([s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)])


def _encoder(
    tokenizer: Tokenizer,
    cfg: ModelConfig,
    seq_len: int,
    template: ChatTemplate | None,
    loss_on: str,
):
    def fn(sample: Sample) -> list[dict[str, np.ndarray]]:
        return [
            {"tokens": ids[:seq_len], "loss": trained[:seq_len].astype(np.int32)}
            for ids, trained in encode(tokenizer, sample, cfg, template, loss_on)
        ]

    return fn


class _Documents(grain.experimental.FlatMapTransform):
    """A sample's documents (the lists `_encoder` makes), one element each."""

    max_fan_out = 1 << 16

    def flat_map(self, documents: list) -> list:
        return documents


def _documents(dataset: grain.MapDataset) -> grain.IterDataset:
    return grain.experimental.FlatMapIterDataset(dataset.to_iter_dataset(), _Documents())


def _to_batch(packed: dict[str, np.ndarray]) -> Batch:
    return {
        "tokens": packed["tokens"],
        "segment_ids": packed["tokens_segment_ids"],
        "positions": packed["tokens_positions"],
        "loss_mask": packed["loss"],
    }


def _packed(
    dataset: grain.IterDataset, seq_len: int, batch_size: int, seed: int
) -> grain.IterDataset:
    packed = grain.experimental.FirstFitPackIterDataset(
        dataset,
        length_struct={"tokens": seq_len, "loss": seq_len},
        num_packing_bins=batch_size,
        seed=seed,
        shuffle_bins=False,
    )
    return packed.map(_to_batch).batch(batch_size, drop_remainder=True)


def _shard(samples: list[Sample], index: int, count: int) -> grain.MapDataset:
    return grain.MapDataset.source(samples)[index::count]


def train_batches(
    samples: list[Sample],
    tokenizer: Tokenizer,
    cfg: ModelConfig,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    general: list[Sample] | None = None,
    general_ratio: float = 1.0,
    shard: tuple[int, int] = (0, 1),
    template: ChatTemplate | None = None,
    loss_on: str = "assistant",
) -> grain.IterDataset:
    """An endless, resumable dataset of packed batches over `shard` = (index, count): the samples
    index, index + count, ... of each dataset (data/shards.py); conversations rendered by
    `template` (None: ESFT's format), `loss_on` their trained tokens (data/chat.py LOSS_ON)."""
    encode_fn = _encoder(tokenizer, cfg, seq_len, template, loss_on)
    task = _shard(samples, *shard).shuffle(seed=seed).repeat().map(encode_fn)
    if general:
        other = _shard(general, *shard).shuffle(seed=seed + 1).repeat().map(encode_fn)
        task = grain.MapDataset.mix([task, other], weights=[1.0, general_ratio])
    return _packed(_documents(task), seq_len, batch_size, seed)


def eval_batches(
    samples: list[Sample],
    tokenizer: Tokenizer,
    cfg: ModelConfig,
    *,
    seq_len: int,
    batch_size: int,
    template: ChatTemplate | None = None,
    loss_on: str = "assistant",
) -> list[Batch]:
    """Every sample once, packed in order; the last batch padded with empty rows."""
    encode_fn = _encoder(tokenizer, cfg, seq_len, template, loss_on)
    dataset = _documents(grain.MapDataset.source(samples).map(encode_fn))
    packed = grain.experimental.FirstFitPackIterDataset(
        dataset,
        length_struct={"tokens": seq_len, "loss": seq_len},
        num_packing_bins=batch_size,
        shuffle_bins=False,
    )
    rows = [_to_batch(r) for r in packed]
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        chunk += [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (batch_size - len(chunk))
        batches.append({k: np.stack([r[k] for r in chunk]) for k in chunk[0]})
    return batches

"""Training batches: tokenise, mix a general dataset in, pack to fixed length, batch (grain).

Each sample becomes {"tokens", "loss"} (loss: 1 on answer tokens). Samples are shuffled with a seed
(reshuffled every epoch), optionally mixed with a second dataset at `general_ratio` general samples
per task sample (the paper mixes task and alignment data 1:1), packed first-fit into rows of
`seq_len` tokens with segment ids (no attention across samples), and batched. The iterator's
position is a small dict (`get_state` / `set_state`), saved with every checkpoint for exact resume.
"""

from __future__ import annotations

import grain
import numpy as np
from tokenizers import Tokenizer

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


def _encoder(tokenizer: Tokenizer, cfg: ModelConfig, seq_len: int):
    def fn(sample: Sample) -> dict[str, np.ndarray]:
        ids, answer = encode(tokenizer, sample, cfg.bos_token_id, cfg.eos_token_id)
        return {"tokens": ids[:seq_len], "loss": answer[:seq_len].astype(np.int32)}

    return fn


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
) -> grain.IterDataset:
    """An endless, resumable dataset of packed batches over `shard` = (index, count): the samples
    index, index + count, ... of each dataset (data/shards.py)."""
    encode_fn = _encoder(tokenizer, cfg, seq_len)
    task = _shard(samples, *shard).shuffle(seed=seed).repeat().map(encode_fn)
    if general:
        other = _shard(general, *shard).shuffle(seed=seed + 1).repeat().map(encode_fn)
        task = grain.MapDataset.mix([task, other], weights=[1.0, general_ratio])
    return _packed(task.to_iter_dataset(), seq_len, batch_size, seed)


def eval_batches(
    samples: list[Sample], tokenizer: Tokenizer, cfg: ModelConfig, *, seq_len: int, batch_size: int
) -> list[Batch]:
    """Every sample once, packed in order; the last batch padded with empty rows."""
    dataset = (
        grain.MapDataset.source(samples).map(_encoder(tokenizer, cfg, seq_len)).to_iter_dataset()
    )
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

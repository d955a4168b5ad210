"""Samples to token ids: BOS + prompt + answer + EOS, with a mask of the answer tokens."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from esft_jax.data.records import Sample


def encode(
    tokenizer: Tokenizer, sample: Sample, bos_id: int | None, eos_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int32, answer_mask [n] bool). Prompt and answer are encoded separately, so the
    boundary between them is exact; BOS belongs to the prompt, EOS to the answer."""
    prompt = ([bos_id] if bos_id is not None else []) + (
        tokenizer.encode(sample.prompt, add_special_tokens=False).ids if sample.prompt else []
    )
    answer = tokenizer.encode(sample.answer, add_special_tokens=False).ids + (
        [eos_id] if eos_id is not None else []
    )
    ids = np.asarray(prompt + answer, np.int32)
    return ids, np.arange(ids.size) >= len(prompt)

"""The checkpoint's tokenizer, read from its `tokenizer.json` with the `tokenizers` library (no hub)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from esft_jax.checkpoint.hf import CheckpointError


def load_tokenizer(ckpt_dir: str | Path) -> Tokenizer:
    path = Path(ckpt_dir) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; the checkpoint directory has no tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad files
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from None

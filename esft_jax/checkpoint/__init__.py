"""Hugging Face checkpoint directories in and out."""

from esft_jax.checkpoint.hf import (
    CheckpointError,
    load_checkpoint,
    load_config,
    load_params,
)
from esft_jax.checkpoint.hf_export import save_checkpoint
from esft_jax.checkpoint.tokenizer import load_tokenizer

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "load_config",
    "load_params",
    "load_tokenizer",
    "save_checkpoint",
]

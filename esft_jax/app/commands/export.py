"""`esft export`: a base checkpoint and an adapter merged into a Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from esft_jax.app import runtime
from esft_jax.app.checks import input_path, one_of, required, writable_dir
from esft_jax.app.config_files import ConfigFileError
from esft_jax.checkpoint import save_checkpoint
from esft_jax.checkpoint.adapter import load_with_adapter
from esft_jax.checkpoint.native_export import export_native
from esft_jax.checkpoint.output_dir import OutputDirError, export_replaceable
from esft_jax.model.config import DTYPES


def check(c: ml_collections.ConfigDict) -> None:
    input_path(c, "checkpoint", "the base checkpoint directory")
    input_path(c, "adapter", "the adapter directory (esft train's <workdir>/adapter)")
    required(c, "out", "the directory to write the merged checkpoint to")
    writable_dir(c, "out")
    one_of(c, "dtype", ("auto", "native", *DTYPES))
    try:  # before the merge: refusing costs nothing (save_checkpoint checks again when it writes)
        export_replaceable(
            Path(c.out),
            c.overwrite,
            (c.checkpoint, c.adapter),
            overwrite_flag="--config.overwrite=True",
        )
    except OutputDirError as e:
        raise ConfigFileError(f"--config.out: {e}") from None


def run(c: ml_collections.ConfigDict) -> None:
    """Base checkpoint + adapter -> a full Hugging Face checkpoint directory."""
    inputs = (c.checkpoint, c.adapter)
    runtime.check_adapter_base(c, c.adapter)
    if c.dtype == "native":  # the base's files with the adapter's tensors, in the base's format
        out = export_native(c.checkpoint, c.adapter, c.out, overwrite=c.overwrite)
        print(f"{c.checkpoint} + {c.adapter} -> {out} (the base's format)")
        return
    cfg, params = load_with_adapter(c.checkpoint, c.adapter)
    out = save_checkpoint(
        c.out,
        cfg,
        params,
        tokenizer_from=c.checkpoint,
        overwrite=c.overwrite,
        inputs=inputs,
        dtype=None if c.dtype == "auto" else c.dtype,
    )
    print(f"{c.checkpoint} + {c.adapter} -> {out}")

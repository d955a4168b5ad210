"""`esft export`: a base checkpoint and an adapter merged into a Hugging Face checkpoint; or several
ESFT adapters merged into one (checkpoint/merge.py), written as a checkpoint and/or an adapter."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ml_collections

from esft_jax.app import runtime
from esft_jax.app.checks import input_path, one_of, required, writable_dir
from esft_jax.app.config_files import ConfigFileError
from esft_jax.checkpoint import save_checkpoint
from esft_jax.checkpoint.adapter import load_with_adapter
from esft_jax.checkpoint.merge import OVERLAP, merge_adapters
from esft_jax.checkpoint.native_export import export_native
from esft_jax.checkpoint.output_dir import OutputDirError, check_not_input, export_replaceable
from esft_jax.model.config import DTYPES


def adapter_list(c: ml_collections.ConfigDict) -> list[str]:
    """--config.adapters as a list: "a,b,c" or "(a, b, c)" (spaces and quotes around each ignored)."""
    text = c.adapters.strip()
    if text.startswith(("(", "[")) and text.endswith((")", "]")):
        text = text[1:-1]
    return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]


def _check_merge(c: ml_collections.ConfigDict) -> list[str]:
    """The adapters to merge, each an existing directory named once; the outputs apart from them."""
    if c.adapter:
        raise ConfigFileError(
            f"--config.adapter={c.adapter}: set --config.adapter (one adapter) or "
            "--config.adapters (several to merge), not both"
        )
    one_of(c, "overlap", OVERLAP)
    sources = adapter_list(c)
    if len(sources) < 2:
        raise ConfigFileError(
            f"--config.adapters={c.adapters}: expected two or more adapter directories, "
            "comma-separated (one adapter: --config.adapter)"
        )
    for i, source in enumerate(sources):
        if not Path(source).is_dir():
            raise ConfigFileError(f"--config.adapters: {source}: no such directory")
        if Path(source).resolve() in [Path(s).resolve() for s in sources[:i]]:
            raise ConfigFileError(f"--config.adapters: {source}: listed twice")
    if not (c.out or c.adapter_out):
        raise ConfigFileError(
            "--config.out: name the directory to write the merged checkpoint to "
            "(or --config.adapter_out for the merged adapter alone)"
        )
    if c.adapter_out:
        writable_dir(c, "adapter_out")
        try:
            check_not_input(Path(c.adapter_out), (c.checkpoint, *sources))
        except OutputDirError as e:
            raise ConfigFileError(f"--config.adapter_out: {e}") from None
        one, other = Path(c.adapter_out).resolve(), Path(c.out).resolve()
        if c.out and (one.is_relative_to(other) or other.is_relative_to(one)):
            raise ConfigFileError(
                f"--config.adapter_out={c.adapter_out}: overlaps --config.out={c.out}; "
                "write the adapter and the checkpoint to separate directories"
            )
    return sources


def check(c: ml_collections.ConfigDict) -> None:
    input_path(c, "checkpoint", "the base checkpoint directory")
    one_of(c, "dtype", ("auto", "native", *DTYPES))
    if c.adapters:
        inputs = (c.checkpoint, *_check_merge(c))
    else:
        input_path(c, "adapter", "the adapter directory (esft train's <workdir>/adapter)")
        required(c, "out", "the directory to write the merged checkpoint to")
        if c.adapter_out:
            raise ConfigFileError(
                f"--config.adapter_out={c.adapter_out}: writes the merge of --config.adapters; "
                "with one --config.adapter there is nothing to merge"
            )
        inputs = (c.checkpoint, c.adapter)
    if not c.out:
        return
    writable_dir(c, "out")
    try:  # before the merge: refusing costs nothing (save_checkpoint checks again when it writes)
        export_replaceable(
            Path(c.out), c.overwrite, inputs, overwrite_flag="--config.overwrite=True"
        )
    except OutputDirError as e:
        raise ConfigFileError(f"--config.out: {e}") from None


def _export(c: ml_collections.ConfigDict, adapter: str | Path, inputs: tuple, named: str) -> None:
    """Base + the adapter directory `adapter` (`named` so in the message) -> c.out."""
    if c.dtype == "native":  # the base's files with the adapter's tensors, in the base's format
        out = export_native(c.checkpoint, adapter, c.out, overwrite=c.overwrite)
        print(f"{c.checkpoint} + {named} -> {out} (the base's format)")
        return
    cfg, params = load_with_adapter(c.checkpoint, adapter)
    out = save_checkpoint(
        c.out,
        cfg,
        params,
        tokenizer_from=c.checkpoint,
        overwrite=c.overwrite,
        inputs=inputs,
        dtype=None if c.dtype == "auto" else c.dtype,
    )
    print(f"{c.checkpoint} + {named} -> {out}")


def run(c: ml_collections.ConfigDict) -> None:
    """Base checkpoint + adapter (or several ESFT adapters, merged) -> a full Hugging Face checkpoint
    directory; --config.adapter_out: the merged adapter."""
    if not c.adapters:
        runtime.check_adapter_base(c, c.adapter)
        _export(c, c.adapter, (c.checkpoint, c.adapter), c.adapter)
        return
    sources = adapter_list(c)
    for source in sources:
        runtime.check_adapter_base(c, source)
    named = f"merged ({', '.join(sources)}; overlap={c.overlap})"
    if c.adapter_out:
        merged = merge_adapters(sources, c.overlap, c.adapter_out)
        print(f"{named} -> {merged}")
        if c.out:
            _export(c, merged, (c.checkpoint, *sources, merged), named)
        return
    out = Path(c.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staged:
        merged = merge_adapters(sources, c.overlap, Path(staged) / "adapter")
        _export(c, merged, (c.checkpoint, *sources), named)

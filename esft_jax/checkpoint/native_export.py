"""`esft export --config.dtype=native`: an adapter merged into its base checkpoint's own files, in the
base's own format.

Nothing is loaded into a model: each of the base's safetensors files is copied tensor by tensor, its
stored bytes unchanged, except the tensors the adapter trained. Where the base holds such a tensor in
fine-grained FP8, the adapter's bf16 tensor is quantised with the base's block size (each block
scaled so its largest magnitude is FP8's largest, as DeepSeek-V3's weights are: model/quant.py) and
written with its new `_scale_inv`; an unquantised base tensor takes the adapter's values in its own
dtype. config.json (with its quantization_config), the index, the tokenizer and every other file are
copied as they are. So an FP8 base exports as FP8 that transformers' fine-grained FP8 loader reads.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from esft_jax.checkpoint import fp8
from esft_jax.checkpoint.adapter import read_adapter
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.checkpoint.hf import _weight_files, read_safetensors
from esft_jax.checkpoint.output_dir import export_replaceable, staged_dir, write_marker
from esft_jax.checkpoint.safetensors_read import DTYPES
from esft_jax.jsonio import read_json
from esft_jax.model import quant

SAFETENSORS_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def export_native(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Write base + adapter to `out_dir` in the base's format (the module docstring); the output
    directory rules of save_checkpoint (checkpoint/output_dir.py)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    inputs = (base_dir, Path(adapter_dir))
    replaceable = export_replaceable(out_dir, overwrite, inputs)
    block = _fp8_block(read_json(base_dir / "config.json", CheckpointError, "no such file"))
    trained, _ = read_adapter(adapter_dir)
    files = _weight_files(base_dir)
    missing = sorted(set(trained) - set(files))
    if missing:
        raise CheckpointError(
            f"{adapter_dir}: tensor {missing[0]} is not one of {base_dir}'s file tensors (experts "
            "stored fused in one tensor?): export it with --config.dtype=auto"
        )
    with staged_dir(out_dir, replaceable=replaceable, inputs=inputs) as tmp:
        for path in sorted(set(files.values())):
            _write_merged(path, tmp / path.name, trained, block)
        for entry in base_dir.iterdir():
            if (
                entry.is_file()
                and entry.suffix != ".safetensors"
                and not entry.name.startswith("esft")
            ):
                shutil.copy2(entry, tmp / entry.name)
        write_marker(tmp, "esft_jax.checkpoint.export_native")
    return out_dir


def _fp8_block(config: Mapping[str, Any]) -> fp8.Block:
    q = config.get("quantization_config")
    if not isinstance(q, Mapping):
        return None
    if q.get("quant_method") != "fp8":
        raise CheckpointError(
            f"--config.dtype=native: a {q.get('quant_method')!r} base is not written back in its "
            "format yet (fine-grained FP8 is); use --config.dtype=auto"
        )
    return fp8.block_size(q)


def _write_merged(
    src: Path, dst: Path, trained: Mapping[str, np.ndarray], block: fp8.Block
) -> None:
    """One base file with the adapter's tensors in it (quantised where the base's are)."""
    out: dict[str, np.ndarray] = {}
    with read_safetensors(src) as f:
        names = set(f.keys())
        for name in f.keys():
            matrix = name.removesuffix(fp8.SCALE_SUFFIX)
            if name in trained:
                if fp8.scale_name(name) in names:  # FP8: re-quantised in the base's blocks
                    scale_dtype = DTYPES[f.get_slice(fp8.scale_name(name)).get_dtype()]
                    out[name], scale = quantize_matrix(trained[name], block)
                    out[fp8.scale_name(name)] = scale.astype(scale_dtype)
                else:
                    out[name] = trained[name].astype(DTYPES[f.get_slice(name).get_dtype()])
            elif name == matrix or matrix not in trained:  # (a trained one's scale: written above)
                out[name] = f.get_tensor(name)
    save_safetensors(out, dst, {"format": "pt"})


def quantize_matrix(w_oi: np.ndarray, block: fp8.Block) -> tuple[np.ndarray, np.ndarray]:
    """An [out, in] matrix -> (FP8 values [out, in], scales [ceil(out/bo), ceil(in/bi)])."""
    if block is None:
        raise CheckpointError(
            "--config.dtype=native: the base's FP8 scales are per matrix, not per block"
        )
    values_io, scale_rc = quant.quantize(jnp.asarray(w_oi, jnp.float32).T, quant.block_io(block))
    return np.asarray(values_io).T.copy(), np.asarray(scale_rc).T.copy()


def save_safetensors(
    tensors: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]
) -> None:
    """A safetensors file of `tensors` as they are, FP8 included (which safetensors' numpy writer
    does not take)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, value in tensors.items():
        header[name] = {
            "dtype": SAFETENSORS_NAMES[np.dtype(value.dtype)],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + value.nbytes],
        }
        offset += value.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for value in tensors.values():
            fh.write(np.ascontiguousarray(value).tobytes())

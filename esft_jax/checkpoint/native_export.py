"""`esft export --config.dtype=native`: an adapter merged into its base checkpoint's own files, in the
base's own format.

Nothing is loaded into a model: each of the base's safetensors files is copied tensor by tensor, its
stored bytes unchanged, except the tensors the adapter trained. Where the base holds such a tensor in
fine-grained FP8, the adapter's bf16 tensor is quantised with the base's block size (each block
scaled so its largest magnitude is FP8's largest, as DeepSeek-V3's weights are: model/quant.py) and
written with its new `_scale_inv`; where the base holds every expert of a layer in one tensor (gpt-oss,
transformers' fused layout), the trained experts' slices of it are rewritten, in MXFP4 `_blocks` /
`_scales` where the base is MXFP4 (model/quant.py's quantiser); an unquantised base tensor takes the
adapter's values in its own dtype. config.json (with its quantization_config), the index, the
tokenizer and every other file are copied as they are. So an FP8 base exports as FP8 that
transformers' fine-grained FP8 loader reads, and gpt-oss's MXFP4 as MXFP4 that its loader reads.
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

from esft_jax.checkpoint import fp8, hf, mxfp4
from esft_jax.checkpoint.adapter import LORA_A, LORA_B, read_adapter
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.checkpoint.families.base import Fused
from esft_jax.checkpoint.output_dir import export_replaceable, staged_dir, write_marker
from esft_jax.checkpoint.safetensors_read import DTYPES
from esft_jax.model import quant

SAFETENSORS_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
# a fused file tensor's key -> (its layout, {expert: {part index: trained tensor, HF [out, in]}})
FusedUpdates = dict[str, tuple[Fused, dict[int, dict[int, np.ndarray]]]]


def export_native(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Write base + adapter to `out_dir` in the base's format (the module docstring); the output
    directory rules of save_checkpoint (checkpoint/output_dir.py)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    inputs = (base_dir, Path(adapter_dir))
    replaceable = export_replaceable(out_dir, overwrite, inputs)
    located = hf.plan(base_dir, hf.load_config(base_dir))
    trained, _ = read_adapter(adapter_dir)
    whole, fused = _updates(trained, located.where, adapter_dir, base_dir)
    with staged_dir(out_dir, replaceable=replaceable, inputs=inputs) as tmp:
        for path in sorted(set(located.files.values())):
            _write_merged(path, tmp / path.name, whole, fused, located.fp8_block)
        for entry in base_dir.iterdir():
            if (
                entry.is_file()
                and entry.suffix != ".safetensors"
                and not entry.name.startswith("esft")
            ):
                shutil.copy2(entry, tmp / entry.name)
        write_marker(tmp, "esft_jax.checkpoint.export_native")
    return out_dir


def _updates(
    trained: Mapping[str, np.ndarray], where: Mapping[str, Any], adapter_dir, base_dir
) -> tuple[dict[str, np.ndarray], FusedUpdates]:
    """The adapter's tensors by the file tensor they go to: whole tensors by their name, and the
    parts of fused ones by file tensor, expert and part."""
    whole: dict[str, np.ndarray] = {}
    fused: FusedUpdates = {}
    for name, value in trained.items():
        if name.endswith((LORA_A, LORA_B)):
            raise CheckpointError(
                f"{adapter_dir}: holds LoRA factors ({name}), which --config.dtype=native does not "
                "merge (it writes whole tensors); export with --config.dtype=auto"
            )
        use = where.get(name)
        if use is None:
            raise CheckpointError(
                f"{adapter_dir}: tensor {name} is not a tensor of {base_dir}'s model"
            )
        if use.fused is None:
            whole[use.key] = value
        elif use.scale is not None:
            raise CheckpointError(
                f"{base_dir}: tensor {use.key} holds FP8 experts fused in one tensor, which "
                "--config.dtype=native does not write; export with --config.dtype=auto"
            )
        else:
            parts = fused.setdefault(use.key, (use.fused, {}))[1]
            parts.setdefault(use.expert, {})[use.part] = value
    return whole, fused


def _write_merged(
    src: Path,
    dst: Path,
    whole: Mapping[str, np.ndarray],
    fused: FusedUpdates,
    block: fp8.Block,
) -> None:
    """One base file with the adapter's tensors in it (quantised where the base's are)."""
    out: dict[str, np.ndarray] = {}
    with hf.read_safetensors(src) as f:
        names = set(f.keys())
        for name in f.keys():
            matrix = name.removesuffix(fp8.SCALE_SUFFIX)
            packed = name.removesuffix("_blocks")
            if name in whole:
                if fp8.scale_name(name) in names:  # FP8: re-quantised in the base's blocks
                    scale_dtype = DTYPES[f.get_slice(fp8.scale_name(name)).get_dtype()]
                    out[name], scale = quantize_matrix(whole[name], block)
                    out[fp8.scale_name(name)] = scale.astype(scale_dtype)
                else:
                    out[name] = whole[name].astype(DTYPES[f.get_slice(name).get_dtype()])
            elif name in fused:
                out[name] = _merged_fused(f.get_tensor(name), *fused[name])
            elif packed in fused and mxfp4.is_mxfp4(names, packed):
                blocks, scales = mxfp4.packed_names(packed)
                out[blocks], out[scales] = _merged_mxfp4(
                    f.get_tensor(blocks), f.get_tensor(scales), *fused[packed]
                )
            elif not (
                (name != matrix and matrix in whole)  # a trained one's scale: written above
                or (name.endswith("_scales") and name.removesuffix("_scales") in fused)
            ):
                out[name] = f.get_tensor(name)
    save_safetensors(out, dst, {"format": "pt"})


def _replaced(name: str, current: list[np.ndarray], parts: Mapping[int, np.ndarray]) -> None:
    for i, value in parts.items():
        if value.shape != current[i].shape:
            raise CheckpointError(
                f"adapter tensor for {name} has shape {list(value.shape)}, the base's part "
                f"{list(current[i].shape)}"
            )
        current[i] = value


def _merged_fused(
    tensor: np.ndarray, fz: Fused, updates: Mapping[int, Mapping[int, np.ndarray]]
) -> np.ndarray:
    """A fused [E, ...] tensor with the trained experts' parts replaced (in its dtype)."""
    out = tensor.copy()
    for e, parts in updates.items():
        current = list(fz.split(tensor[e]))
        _replaced(fz.name, current, {i: v.astype(tensor.dtype) for i, v in parts.items()})
        out[e] = fz.join(tuple(current))
    return out


def _merged_mxfp4(
    blocks: np.ndarray,
    scales: np.ndarray,
    fz: Fused,
    updates: Mapping[int, Mapping[int, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """gpt-oss's `_blocks` [E, out, in/32, 16] and `_scales` [E, out, in/32] with the trained
    experts' parts quantised into them (model/quant.py's MXFP4, in our layout: cut and joined as
    the family's fused layout cuts a dequantised slice)."""
    blocks, scales = blocks.copy(), scales.copy()
    for e, parts in updates.items():
        values = list(fz.split(blocks[e].reshape(blocks.shape[1], -1).T))  # HF parts [out, in/2]
        exps = list(fz.split(scales[e].T))  # [out, in/32]
        quantized = {
            i: quant.Mxfp4().quantize(jnp.asarray(v, jnp.float32).T) for i, v in parts.items()
        }
        _replaced(fz.name, values, {i: np.asarray(q[0]).T for i, q in quantized.items()})
        _replaced(fz.name, exps, {i: np.asarray(q[1]).T for i, q in quantized.items()})
        blocks[e], scales[e] = mxfp4.to_file(fz.join(tuple(values)), fz.join(tuple(exps)))
    return blocks, scales


def quantize_matrix(w_oi: np.ndarray, block: fp8.Block) -> tuple[np.ndarray, np.ndarray]:
    """An [out, in] matrix -> (FP8 values [out, in], scales [ceil(out/bo), ceil(in/bi)])."""
    if block is None:
        raise CheckpointError(
            "--config.dtype=native: the base's FP8 scales are per matrix, not per block"
        )
    scheme = quant.Fp8Blocks(quant.block_io(block))
    values_io, scale_rc = scheme.quantize(jnp.asarray(w_oi, jnp.float32).T)
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

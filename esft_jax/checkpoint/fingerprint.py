"""Which base an adapter was trained on: a fingerprint of a checkpoint, cheap to compute.

An adapter holds only the tensors a fine-tune changed, so applied to another base (another size, or
the same architecture with other weights, e.g. DeepSeek-V2-Lite instead of ESFT-vanilla-lite) it
still loads, and silently gives a model nobody trained. The fingerprint hashes config.json and,
per tensor of the safetensors files (sorted by name, whatever the sharding into files), its
dtype, shape and the first and last `_EDGE` bytes of its data: a few small reads per tensor, no
weights read, yet two checkpoints of one architecture with different weights differ. Seeded random
weights (`checkpoint=random`) are fingerprinted by their model config and seed.

`adapter_config.json` records it as `base_model_fingerprint` beside PEFT's
`base_model_name_or_path`; `check_base` refuses an adapter whose fingerprint is another base's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.checkpoint.hf import _weight_files, read_safetensors
from esft_jax.jsonio import read_json

log = logging.getLogger(__name__)

FINGERPRINT, BASE_PATH = "base_model_fingerprint", "base_model_name_or_path"
_EDGE = 64  # bytes read at each end of every tensor


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def checkpoint_fingerprint(ckpt_dir: str | Path) -> str:
    """The fingerprint of a Hugging Face checkpoint directory (config.json + safetensors)."""
    ckpt_dir = Path(ckpt_dir)
    config = read_json(ckpt_dir / "config.json", CheckpointError, "no such file")
    hasher = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    by_file: dict[Path, list[str]] = {}
    for name, file in _weight_files(ckpt_dir).items():
        by_file.setdefault(file, []).append(name)
    edges: dict[str, bytes] = {}
    for file, names in by_file.items():
        with read_safetensors(file) as tensors:
            for name in names:
                edges[name] = tensors.edges(name, _EDGE)
    for name in sorted(edges):
        hasher.update(name.encode() + b"\0" + edges[name])
    return hasher.hexdigest()[:24]


def random_fingerprint(hf_config: dict, seed: int) -> str:
    """The fingerprint of seeded random weights: the model's config.json dict and the seed."""
    return _digest("random", hf_config, seed)


def base_metadata(path: str, fingerprint: str) -> dict[str, str]:
    """The adapter_config.json entries that name the base an adapter was trained on."""
    return {BASE_PATH: path, FINGERPRINT: fingerprint}


def check_base(
    where: str | Path, metadata: dict, fingerprint: str, base: str, allow_other: bool
) -> None:
    """CheckpointError (one line) if the adapter (config `metadata`, read from `where`) was trained
    on another base than `base` (fingerprint `fingerprint`), unless `allow_other`. An adapter that
    names no base (written before fingerprints) is accepted with a warning."""
    recorded = metadata.get(FINGERPRINT)
    if recorded is None:
        log.warning("%s: records no base fingerprint; not checked against %s", where, base)
        return
    if recorded == fingerprint or allow_other:
        return
    trained_on = metadata.get(BASE_PATH, "another checkpoint")
    raise CheckpointError(
        f"{where}: adapter trained on {trained_on} (fingerprint {recorded}), not on {base} "
        f"(fingerprint {fingerprint}); pass --config.allow_other_base=True to apply it anyway"
    )

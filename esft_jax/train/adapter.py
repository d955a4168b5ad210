"""The adapter a training run leaves: the tensors its method changed (checkpoint/adapter.py format).

ESFT: the selected experts' gate/up/down tensors (+ shared experts / non-expert tensors if their
flags are set). FFT: every tensor. LoRA: the A/B factors of every adapted weight.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esft_jax.checkpoint.adapter import LORA_A, LORA_B, write_adapter
from esft_jax.checkpoint.hf_names import tensor_maps
from esft_jax.model.config import ModelConfig
from esft_jax.sharding import to_host
from esft_jax.train.lora import LoRA
from esft_jax.train.trainable import ALWAYS_FROZEN, FullFineTune, Params, is_shared


def _changed_by(method):
    """Predicate on TensorMaps: does the method train this tensor?"""
    if isinstance(method, FullFineTune):
        return lambda m: True
    selected = set(map(tuple, method.rows.tolist()))  # (moe layer index, expert)
    ec = method.expert_config

    def changed(m) -> bool:
        if "experts" in m.path:
            return m.index in selected
        if m.path[-1] in ALWAYS_FROZEN:
            return False
        return ec.shared_experts if is_shared(m.path) else ec.non_expert_modules

    return changed


def save_adapter(out_dir: str | Path, cfg: ModelConfig, method, frozen: Params, trainable: Params,
                 write: bool = True) -> Path:
    """The changed tensors under their HF names. In a multi-process run every process calls this
    (gathering is collective) and the one with write=True writes."""
    maps = tensor_maps(cfg)
    if isinstance(method, LoRA):
        tensors = {}
        host = to_host(trainable)
        for m in maps:
            ab = host.get("/".join(m.path))
            if ab is not None:
                tensors[m.hf_name[: -len(".weight")] + LORA_A] = np.asarray(ab["a"][m.index]).T
                tensors[m.hf_name[: -len(".weight")] + LORA_B] = np.asarray(ab["b"][m.index]).T
        metadata = {"method": "lora", "r": method.rank, "lora_alpha": method.alpha, "targets": list(method.targets)}
    else:
        full = to_host(method.write_back(frozen, trainable))
        changed = _changed_by(method)
        tensors = {}
        for m in maps:
            if changed(m):
                node = full
                for key in m.path:
                    node = node[key]
                tensors[m.hf_name] = m.to_hf(np.asarray(node[m.index] if m.index else node))
        metadata = {"method": "fft"} if isinstance(method, FullFineTune) else \
            {"method": "esft", "expert_config": method.expert_config.to_json()}
    metadata["model_type"] = cfg.model_type
    return write_adapter(out_dir, tensors, metadata) if write else Path(out_dir)

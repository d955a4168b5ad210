"""What trains: the pytree helpers the training methods share (train/method.py: TrainingMethod; one
module per method: esft.py, fft.py, lora.py, esft_lora.py, router_only.py): the frozen params
overlaid with a trained part, the shared-expert and non-expert parts, float32 master copies, the
model's tensors in Hugging Face names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from esft_jax.checkpoint.hf_names import TensorMap, tensor_maps
from esft_jax.model.config import ModelConfig
from esft_jax.sharding import to_host

Params = dict[str, Any]


def overlay(base: Params, top: Params) -> Params:
    """`base` with every leaf that `top` also has replaced by top's (nested dicts)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = overlay(base[key], value) if isinstance(value, dict) else value
    return out


SHARED = ("shared", "shared_gate")  # the shared experts and their gate (Qwen2-MoE)
# Never trained by ESFT: the choice correction of noaux_tc routers is a load-balancing buffer, not a
# weight of the loss (the reference updates it outside the optimiser).
ALWAYS_FROZEN = ("router_correction",)


def is_shared(path: tuple[str, ...]) -> bool:
    """Whether a param path, e.g. ("moe_layers", "moe", "shared", "up"), is part of the shared experts."""
    return path[1:2] == ("moe",) and path[2] in SHARED


def non_expert_part(params: Params) -> Params:
    """Everything but the routed and shared experts (and the frozen buffers): attention, norms,
    embeddings, head, router (and its logit bias), and the dense layers' MLPs."""
    out = {k: v for k, v in params.items() if k != "moe_layers"}
    if "moe_layers" in params:
        moe_layers = dict(params["moe_layers"])
        skip = ("experts", *SHARED, *ALWAYS_FROZEN)
        moe_layers["moe"] = {k: v for k, v in moe_layers["moe"].items() if k not in skip}
        out["moe_layers"] = moe_layers
    return out


def tree_size(tree: Params) -> int:
    """The number of values in a pytree's arrays."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def float32_copy(tree: Params) -> Params:
    """Float32 copies (never aliases of the frozen arrays: the train step donates its state)."""
    return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), tree)


def cast_like(tree: Params, like: Params) -> Params:
    return jax.tree.map(lambda x, ref: x.astype(ref.dtype), tree, like)


def hf_tensors(
    cfg: ModelConfig, params: Params, changed: Callable[[TensorMap], bool]
) -> dict[str, np.ndarray]:
    """The whole tensors `changed` picks from full params, in HF layout under their HF names (an
    adapter's content). Gathers params to the host: in a multi-process run every process calls this."""
    leaves = traverse_util.flatten_dict(to_host(params))
    return {
        m.hf_name: m.to_hf(leaves[m.path][m.index] if m.index else leaves[m.path])
        for m in tensor_maps(cfg)
        if changed(m)
    }

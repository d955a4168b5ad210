"""Several ESFT adapters of one base merged into one adapter: several domains, one model.

Each ESFT adapter replaces whole tensors (its trained experts' rows, and the shared experts' or
non-expert tensors where its expert config flags them), so adapters that trained disjoint tensors
merge exactly: the merged adapter holds each one's tensors as they are, and base + merged adapter
equals the base with every adapter applied in turn. A tensor two or more adapters trained follows
the `overlap` rule: `refuse` (one line naming the adapters and the layer's expert or the tensor),
`average` (the float64 mean of their values, cast to the dtype they store) or `first` (the first
adapter, in the order given, that holds it).

Refused in one line: adapters of different bases (their recorded fingerprint or model type,
checkpoint/fingerprint.py), and adapters of any other method. LoRA adapters are not merged: their
factors change every targeted tensor, so two of them overlap on all of those (`first` would be the
first adapter alone), and the mean of two merged weights is no pair of rank-r factors.

The merged adapter has the same format (every consumer of an adapter reads it) and records its
making in `adapter_config.json`: `merge` = {"overlap", "sources", "experts" (model layer -> expert
-> the sources whose rows it holds), "tensors" (the same for the other tensors)}; `expert_config`:
its experts and the sources' flags; no `routing_profile` (each source's was of its own experts and
task).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from esft_jax.checkpoint.adapter import CONFIG_FILE, read_adapter, write_adapter
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.checkpoint.fingerprint import BASE_PATH, FINGERPRINT

log = logging.getLogger(__name__)

OVERLAP = ("refuse", "average", "first")
METHOD = "esft"  # the one method whose adapters merge
# a routed expert's tensor under its canonical name, in every family (checkpoint/hf_names.py)
_EXPERT = re.compile(r"model\.layers\.(\d+)\..*\.experts\.(\d+)\.")

Tensors = Mapping[str, np.ndarray]  # Hugging Face name -> tensor


def expert_of(name: str) -> tuple[int, int] | None:
    """(model layer, expert) of a routed expert's tensor name; None for any other tensor."""
    found = _EXPERT.match(name)
    return (int(found[1]), int(found[2])) if found else None


def _what(name: str) -> str:
    expert = expert_of(name)
    return f"layer {expert[0]}'s expert {expert[1]}" if expert else name


def _both(labels: Sequence[str]) -> str:
    """ "a and b both" / "a, b and c all"."""
    listed = f"{', '.join(labels[:-1])} and {labels[-1]}"
    return f"{listed} {'both' if len(labels) == 2 else 'all'}"


def merge_tensors(
    adapters: Mapping[str, Tensors], overlap: str
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """(merged tensors by HF name, the adapters each one's values came from) of `adapters` (label ->
    tensors, in priority order) under the rule `overlap` (OVERLAP; the module docstring)."""
    if overlap not in OVERLAP:
        raise CheckpointError(f"overlap={overlap!r}: expected one of {', '.join(OVERLAP)}")
    holders: dict[str, list[str]] = {}
    for label, tensors in adapters.items():
        for name in tensors:
            holders.setdefault(name, []).append(label)
    shared = {name: labels for name, labels in holders.items() if len(labels) > 1}
    if shared and overlap == "refuse":
        name, labels = next(iter(shared.items()))
        more = len({expert_of(n) or n for n in shared}) - 1
        raise CheckpointError(
            f"{_both(labels)} trained {_what(name)}"
            + (f" (and {more} more overlapping experts or tensors)" if more else "")
            + "; pass --config.overlap=average or --config.overlap=first to merge them"
        )
    merged: dict[str, np.ndarray] = {}
    sources: dict[str, list[str]] = {}
    for name, labels in holders.items():
        values = [np.asarray(adapters[label][name]) for label in labels]
        for label, value in zip(labels[1:], values[1:]):
            if (value.shape, value.dtype) != (values[0].shape, values[0].dtype):
                raise CheckpointError(
                    f"{label}: tensor {name} is {value.dtype}{list(value.shape)}, "
                    f"{labels[0]}'s {values[0].dtype}{list(values[0].shape)}"
                )
        if len(values) == 1 or overlap == "first":
            merged[name], sources[name] = values[0], labels[:1]
        else:
            mean = sum(v.astype(np.float64) for v in values) / len(values)
            merged[name], sources[name] = mean.astype(values[0].dtype), list(labels)
    return merged, sources


def check_mergeable(metadatas: Mapping[str, dict[str, Any]]) -> None:
    """CheckpointError (one line) unless every adapter (label -> its adapter_config.json) is an ESFT
    adapter and all record the same base; one that records no base fingerprint is let through with a
    warning (as check_base does)."""
    for label, metadata in metadatas.items():
        method = metadata.get("method")
        if method != METHOD:
            raise CheckpointError(
                f"{Path(label) / CONFIG_FILE}: method {method!r}: only ESFT adapters merge "
                "(each replaces whole expert rows; LoRA, FFT and router adapters are refused)"
            )
    for key in (FINGERPRINT, "model_type"):
        recorded = [(label, m[key]) for label, m in metadatas.items() if key in m]
        for label, value in recorded[1:]:
            first, first_value = recorded[0]
            if value != first_value:
                raise CheckpointError(
                    f"{Path(label) / CONFIG_FILE}: {key} {value!r} (base "
                    f"{metadatas[label].get(BASE_PATH, '?')}), {first}'s {first_value!r} (base "
                    f"{metadatas[first].get(BASE_PATH, '?')}): adapters of different bases do "
                    "not merge"
                )
    for label, metadata in metadatas.items():
        if FINGERPRINT not in metadata:
            log.warning("%s: records no base fingerprint; not checked against the others", label)


def _expert_config(metadatas: Mapping[str, dict[str, Any]], experts: dict) -> dict | None:
    """The merged adapter's expert config (the official JSON): its experts (`experts`: model layer ->
    expert -> ..., ids ascending) and the sources' flags or-ed; None where a source records none."""
    configs = [m.get("expert_config") for m in metadatas.values()]
    if not all(isinstance(ec, dict) for ec in configs):
        return None
    return {
        "experts": {layer: [int(e) for e in ids] for layer, ids in experts.items()},
        **{
            flag: any(ec.get(flag) is True for ec in configs)
            for flag in ("shared_experts", "non_expert_modules")
        },
    }


def _provenance(sources: Mapping[str, list[str]]) -> tuple[dict, dict]:
    """(model layer -> expert -> the adapters its rows came from, other tensor -> its adapters)."""
    experts: dict[tuple[int, int], list[str]] = {}
    tensors: dict[str, list[str]] = {}
    for name, labels in sources.items():
        expert = expert_of(name)
        if expert is None:
            tensors[name] = labels
            continue
        came = experts.setdefault(expert, [])
        came += [label for label in labels if label not in came]
    by_layer: dict[str, dict[str, list[str]]] = {}
    for (layer, e), came in sorted(experts.items()):
        by_layer.setdefault(str(layer), {})[str(e)] = came
    return by_layer, tensors


def merge(
    adapters: Mapping[str, tuple[Tensors, dict[str, Any]]], overlap: str
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, adapter_config.json) of the adapter merging `adapters` (label -> (tensors, its
    adapter_config.json), in priority order) under `overlap`: checked (check_mergeable), merged
    (merge_tensors), its making recorded (the module docstring)."""
    metadatas = {label: metadata for label, (_, metadata) in adapters.items()}
    check_mergeable(metadatas)
    tensors, sources = merge_tensors(
        {label: tensors for label, (tensors, _) in adapters.items()}, overlap
    )
    first = next(iter(metadatas.values()))
    experts, others = _provenance(sources)
    expert_config = _expert_config(metadatas, experts)
    metadata = {
        "method": METHOD,
        **{k: first[k] for k in ("model_type", BASE_PATH, FINGERPRINT) if k in first},
        **({"expert_config": expert_config} if expert_config is not None else {}),
        "merge": {
            "overlap": overlap,
            "sources": list(adapters),
            "experts": experts,
            "tensors": others,
        },
    }
    return tensors, metadata


def merge_adapters(adapter_dirs: Sequence[str | Path], overlap: str, out_dir: str | Path) -> Path:
    """Merge the adapter directories `adapter_dirs` (in priority order) into a new adapter directory
    `out_dir` (merge; write_adapter's rules, and never over an input); returns `out_dir`."""
    labels = [str(d) for d in adapter_dirs]
    resolved = [Path(d).resolve() for d in adapter_dirs]
    twice = next((label for label, r in zip(labels, resolved) if resolved.count(r) > 1), None)
    if twice is not None:
        raise CheckpointError(f"{twice}: listed twice among the adapters to merge")
    tensors, metadata = merge({label: read_adapter(label) for label in labels}, overlap)
    return write_adapter(out_dir, tensors, metadata, inputs=labels)

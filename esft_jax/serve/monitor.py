"""The routing monitor: how much of a request's routed gate mass lands on its adapter's trained
experts ("coverage").

An ESFT adapter changes only the experts its task routes to; a request whose tokens go elsewhere
is served mostly by the base model's experts, a sign that it is outside the adapter's domain.
Coverage is the routing the request was served with: the router is the base model's (ESFT never
trains it), but from the second MoE layer on it reads what the adapter's experts made of the
earlier layers, so it is measured in the adapter's own forward pass (the engine sums it while
decoding; `coverage` recomputes it in one pass), per MoE layer and over all layers.

`Monitor` compares it with the adapter's routing profile (its coverage on its own task's profiled
data: routing/expected.py): a request whose coverage in some layer falls below ood_ratio x that
layer's profiled coverage is flagged out-of-domain. It keeps per-model live statistics of the
finished requests (`snapshot`: /v1/routing, and /metrics through serve/metrics.py).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from esft_jax import sharding
from esft_jax.errors import UserError
from esft_jax.eval.generate import padded_rows
from esft_jax.model import ModelConfig, forward
from esft_jax.model.params import Params
from esft_jax.serve.bank import BASE, AdapterBank


class Coverage(NamedTuple):
    total: float  # share of the gate mass of every routed assignment on trained experts
    per_layer: tuple[float, ...]  # the same per MoE layer (cfg.moe_layer_ids order)

    @classmethod
    def of(cls, hit_l: np.ndarray, mass_l: np.ndarray) -> Coverage:
        """From per-layer sums: gate mass on trained experts [L] and all routed gate mass [L]."""
        hit_l, mass_l = np.asarray(hit_l, np.float64), np.asarray(mass_l, np.float64)
        mass_l = np.maximum(mass_l, np.finfo(np.float32).tiny)  # a layer nothing was routed in
        return cls(float(hit_l.sum() / mass_l.sum()), tuple((hit_l / mass_l).tolist()))


def trained_experts(bank: AdapterBank, num_experts: int) -> np.ndarray:
    """[A, L, E] bool: set a trained expert e of MoE layer l (set 0, the base, trains none)."""
    ids_las = np.asarray(bank.override["ids"])
    mask = np.zeros((ids_las.shape[1], ids_las.shape[0], num_experts + 1), bool)
    layers, sets, _ = np.indices(ids_las.shape)
    mask[sets, layers, np.where(ids_las >= 0, ids_las, num_experts)] = True
    return mask[..., :num_experts]


_forward = jax.jit(forward, static_argnames="cfg")


def coverage(
    params: Params,
    cfg: ModelConfig,
    bank: AdapterBank,
    sets: Sequence[int],
    sequences: Sequence[Sequence[int]],
    mesh: Mesh | None = None,
) -> list[Coverage]:
    """Coverage of each token sequence (a request's prompt + output) served by set `sets[i]` of the
    bank (params on `mesh`, if given: the rows are split over its batch axes, as in generation)."""
    width = max(len(s) for s in sequences)
    rows = padded_rows(len(sequences), cfg, mesh)
    tokens, segments = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)], segments[row, : len(seq)] = seq, 1
    tokens_bt, segments_bt = sharding.place_rows((tokens, segments), mesh)
    sets_b = np.array([*sets] + [BASE] * (rows - len(sets)), np.int32)
    with sharding.on_mesh(mesh):
        served = bank.with_overrides(params)
        _, routing = _forward(
            served, tokens_bt, cfg, segment_ids_bt=segments_bt, override_set_b=sets_b
        )
    ids_lbtk, w_lbtk = np.asarray(routing.expert_ids), np.asarray(routing.gate_weights, np.float64)
    w_lbtk = w_lbtk * segments[None, :, :, None]  # padding carries no mass
    trained = trained_experts(bank, cfg.n_routed_experts)
    out = []
    for row, s in enumerate(sets):
        layers = np.arange(ids_lbtk.shape[0])[:, None, None]
        on_trained = trained[s][layers, ids_lbtk[:, row]]  # [L, T, k]
        mass_l = w_lbtk[:, row].sum(axis=(1, 2))
        hit_l = (w_lbtk[:, row] * on_trained).sum(axis=(1, 2))
        out.append(Coverage.of(hit_l, mass_l))
    return out


class MonitorError(UserError, ValueError):
    """A monitor setting that cannot be used (a bad ratio, an audit log that cannot be written)."""


@dataclasses.dataclass
class _Live:
    """One served model's running sums."""

    requests: int = 0
    flagged: int = 0
    fallback: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    coverage: float = 0.0  # sum of coverage totals
    per_layer: np.ndarray | None = None  # [L] sum of per-layer coverage


class Monitor:
    """Flags out-of-domain requests and keeps live routing statistics per served model.
    Thread-safe: every method may be called from any thread.

    Models are named as in requests: an adapter of `bank`, or None for the base model (shown as
    `base_name` in the snapshot). `layers` labels the per-layer values (the model's MoE layer
    numbers, cfg.moe_layer_ids; default: MoE layer indices 0, 1, ...).
    """

    def __init__(
        self,
        bank: AdapterBank,
        *,
        ood_ratio: float = 0.5,
        base_name: str = "base",
        layers: Sequence[int] | None = None,
    ):
        if isinstance(ood_ratio, bool) or not isinstance(ood_ratio, (int, float)):
            raise MonitorError(f"monitor.ood_ratio: expected a number, got {ood_ratio!r}")
        if not (math.isfinite(ood_ratio) and ood_ratio >= 0):
            raise MonitorError(f"monitor.ood_ratio: must be >= 0, got {ood_ratio!r}")
        num_layers = int(bank.override["ids"].shape[0])
        self.layers = list(range(num_layers)) if layers is None else [int(x) for x in layers]
        if len(self.layers) != num_layers:
            raise ValueError(f"{len(self.layers)} layer labels for {num_layers} MoE layers")
        self.bank, self.ood_ratio, self.base_name = bank, float(ood_ratio), base_name
        self._lock = threading.Lock()
        self._live = {name: _Live() for name in (None, *bank.names)}

    def _name(self, name: str | None) -> str:
        return self.base_name if name is None else name

    def flagged(self, name: str | None, coverage: Coverage) -> bool:
        """Whether a request to model `name` with this coverage is out-of-domain: in some MoE
        layer below ood_ratio x the adapter's profiled coverage of that layer (layers where the
        adapter trains no expert do not count). Never for the base model or an unprofiled adapter.

        Per layer, not over all layers: the tokens every prompt shares (BOS, the chat template)
        route alike whatever the task and lift the total; a foreign task shows as a layer whose
        task experts it passes by (docs/monitor.md)."""
        profile = self.bank.profile(name)
        if profile is None:
            return False
        pairs = zip(coverage.per_layer, profile["per_layer"], strict=True)
        return any(got < self.ood_ratio * want for got, want in pairs if want > 0)

    def record(
        self,
        name: str | None,
        coverage: Coverage,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        latency_s: float,
        flagged: bool,
        fallback: bool,
    ) -> None:
        """Count one finished request to model `name` (the model it asked for: its coverage is on
        that adapter's experts, even when `fallback` answered it with the base model)."""
        self.bank.index(name)  # KeyError for a model the bank does not serve
        per_layer = np.asarray(coverage.per_layer, np.float64)
        if per_layer.shape != (len(self.layers),):
            raise ValueError(
                f"coverage of {per_layer.size} layers; the model has {len(self.layers)}"
            )
        with self._lock:
            live = self._live[name]
            live.requests += 1
            live.flagged += bool(flagged)
            live.fallback += bool(fallback)
            live.prompt_tokens += int(prompt_tokens)
            live.completion_tokens += int(completion_tokens)
            live.latency_s += float(latency_s)
            live.coverage += float(coverage.total)
            live.per_layer = per_layer if live.per_layer is None else live.per_layer + per_layer

    def snapshot(self) -> dict:
        """What /v1/routing returns: {"ood_ratio", "layers", "models": {name: {"requests",
        "flagged", "fallback", "coverage" (mean total), "per_layer" (mean per layer), "profiled"
        (the profile's total), "profiled_per_layer", "prompt_tokens", "completion_tokens",
        "tokens", "mean_latency_s"}}}, means null before a model's first request, profiles null
        for the base model and unprofiled adapters."""
        with self._lock:
            live = {name: dataclasses.replace(v) for name, v in self._live.items()}
        models = {}
        for name, v in live.items():
            profile = self.bank.profile(name)
            n = v.requests
            models[self._name(name)] = {
                "requests": n,
                "flagged": v.flagged,
                "fallback": v.fallback,
                "coverage": v.coverage / n if n else None,
                "per_layer": (v.per_layer / n).tolist() if n else None,
                "profiled": None if profile is None else profile["total"],
                "profiled_per_layer": None if profile is None else profile["per_layer"],
                "prompt_tokens": v.prompt_tokens,
                "completion_tokens": v.completion_tokens,
                "tokens": v.prompt_tokens + v.completion_tokens,
                "mean_latency_s": v.latency_s / n if n else None,
            }
        return {"ood_ratio": self.ood_ratio, "layers": list(self.layers), "models": models}

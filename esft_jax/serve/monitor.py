"""The routing monitor: how much of a request's routed gate mass lands on its adapter's trained
experts ("coverage").

An ESFT adapter changes only the experts its task routes to; a request whose tokens go elsewhere
is served mostly by the base model's experts, a sign that it is outside the adapter's domain.
Coverage is computed from the request's prompt and generated tokens in one forward pass (the
router is the base model's: ESFT never trains it), per MoE layer and over all layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from esft_jax import sharding
from esft_jax.eval.generate import padded_rows
from esft_jax.model import ModelConfig, forward
from esft_jax.model.params import Params
from esft_jax.serve.bank import AdapterBank


class Coverage(NamedTuple):
    total: float  # share of the gate mass of every routed assignment on trained experts
    per_layer: tuple[float, ...]  # the same per MoE layer (cfg.moe_layer_ids order)


def trained_experts(bank: AdapterBank, num_experts: int) -> np.ndarray:
    """[A, L, E] bool: set a trained expert e of MoE layer l (set 0, the base, trains none)."""
    ids_las = np.asarray(bank.override["ids"])
    mask = np.zeros((ids_las.shape[1], ids_las.shape[0], num_experts + 1), bool)
    layers, sets, _ = np.indices(ids_las.shape)
    mask[sets, layers, np.where(ids_las >= 0, ids_las, num_experts)] = True
    return mask[..., :num_experts]


_forward = jax.jit(forward, static_argnums=2)


def coverage(
    params: Params,
    cfg: ModelConfig,
    bank: AdapterBank,
    sets: Sequence[int],
    sequences: Sequence[Sequence[int]],
    mesh: Mesh | None = None,
) -> list[Coverage]:
    """Coverage of each token sequence (a request's prompt + output) under its set `sets[i]` (params
    on `mesh`, if given: the rows are split over its batch axes, as in generation)."""
    width = max(len(s) for s in sequences)
    rows = padded_rows(len(sequences), cfg, mesh)
    tokens, segments = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)], segments[row, : len(seq)] = seq, 1
    tokens_bt, segments_bt = sharding.place_rows((tokens, segments), mesh)
    with sharding.on_mesh(mesh):
        _, routing = _forward(params, tokens_bt, cfg, segment_ids_bt=segments_bt)
    ids_lbtk, w_lbtk = np.asarray(routing.expert_ids), np.asarray(routing.gate_weights, np.float64)
    w_lbtk = w_lbtk * segments[None, :, :, None]  # padding carries no mass
    trained = trained_experts(bank, cfg.n_routed_experts)
    out = []
    for row, s in enumerate(sets):
        layers = np.arange(ids_lbtk.shape[0])[:, None, None]
        on_trained = trained[s][layers, ids_lbtk[:, row]]  # [L, T, k]
        mass_l = w_lbtk[:, row].sum(axis=(1, 2))
        hit_l = (w_lbtk[:, row] * on_trained).sum(axis=(1, 2))
        out.append(Coverage(float(hit_l.sum() / mass_l.sum()), tuple((hit_l / mass_l).tolist())))
    return out

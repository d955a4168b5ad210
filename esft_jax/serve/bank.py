"""The adapter bank: every served ESFT adapter's trained expert rows, beside one base model.

An ESFT adapter replaces whole rows of the stacked experts (its selected (layer, expert) pairs), so
N adapters need the base once plus their rows, not N merged copies. The bank stacks them as the
model's expert overrides with one set per adapter (model/moe.py): ids [L, A, S] (-1: an unused
override slot) and weights [L, A, S, ...], where set 0 is the base model (no overrides) and set i the
i-th adapter. A batch row picks its set with an index passed to the forward pass beside the tokens
(`override_set_b`), so one compiled step serves any mix of adapters.
Each adapter's routing profile (adapter_config.json's "routing_profile", written by esft train from
the expert config: routing/expected.py) is kept for the routing monitor (serve/monitor.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from esft_jax.checkpoint.adapter import CONFIG_FILE, adapter_updates, read_adapter
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.model import quant
from esft_jax.model.config import ModelConfig
from esft_jax.model.params import Params
from esft_jax.routing.expected import check_profile

BASE = 0  # the set index of the base model


@dataclasses.dataclass(frozen=True)
class AdapterBank:
    names: tuple[str, ...]  # set i + 1 is adapter names[i]
    override: dict[str, jax.Array]  # ids [L, A, S]; the expert leaves [L, A, S, ...]
    experts: tuple[
        dict[int, list[int]], ...
    ]  # per adapter: MoE layer index -> the experts it trained
    # per adapter: its routing profile (routing/expected.py), None for one trained without
    profiles: tuple[dict | None, ...]

    def index(self, name: str | None) -> int:
        """The set of adapter `name` (None: the base model)."""
        if name is None:
            return BASE
        if name not in self.names:
            raise KeyError(f"no adapter {name!r}; served: {', '.join(self.names) or 'none'}")
        return self.names.index(name) + 1

    def profile(self, name: str | None) -> dict | None:
        """Adapter `name`'s routing profile (None for the base model or an adapter without one)."""
        return None if name is None else self.profiles[self.index(name) - 1]

    def with_overrides(self, params: Params) -> Params:
        """The base params with the bank's sets as the MoE layers' expert overrides (a forward
        pass over them takes each batch row's set: override_set_b)."""
        moe_layers = dict(params["moe_layers"])
        moe_layers["moe"] = {**moe_layers["moe"], "override": self.override}
        return {**params, "moe_layers": moe_layers}


def _expert_rows(
    cfg: ModelConfig, experts: Params, adapter_dir: Path, tensors: dict, metadata: dict
) -> dict[tuple[int, int], dict]:
    """(MoE layer index, expert) -> every expert leaf's row with the adapter applied (the base row
    where the adapter leaves a leaf of that expert unchanged)."""
    rows: dict[tuple[int, int], dict] = {}
    for m, update in adapter_updates(cfg, tensors, metadata, str(adapter_dir)):
        if m.path[:3] != ("moe_layers", "moe", "experts"):
            raise CheckpointError(
                f"{adapter_dir}: {m.hf_name} is not a routed expert's tensor; the bank serves "
                "adapters of expert rows only (serve this one merged: esft export)"
            )
        if m.index not in rows:  # the base's row (quantised experts dequantised to bf16)
            base = quant.rows(experts, m.index, cfg.expert_scheme, "bfloat16")
            rows[m.index] = {k: np.asarray(w) for k, w in base.items()}
        row = rows[m.index]
        row[m.path[-1]] = update(row[m.path[-1]])
    return rows


def build_bank(cfg: ModelConfig, params: Params, adapters: Mapping[str, str | Path]) -> AdapterBank:
    """The bank of the adapters `adapters` (name -> adapter directory) over `params` (the base)."""
    experts = jax.tree.map(np.asarray, params["moe_layers"]["moe"]["experts"])
    per_adapter, profiles = [], []
    for d in map(Path, adapters.values()):  # one adapter's tensors in memory at a time
        tensors, metadata = read_adapter(d)
        profiles.append(_profile(cfg, d / CONFIG_FILE, metadata))
        per_adapter.append(_expert_rows(cfg, experts, d, tensors, metadata))
    num_layers, num_sets = cfg.num_moe_layers, len(per_adapter) + 1
    width = max(
        [1]
        + [
            sum(li == layer for li, _ in rows)
            for rows in per_adapter
            for layer in range(num_layers)
        ]
    )
    ids = np.full((num_layers, num_sets, width), -1, np.int32)
    # the rows' leaves: every matrix and bias, quantised ones in bf16 (as a bf16 load holds them)
    one_row = quant.rows(experts, (0, 0), cfg.expert_scheme, "bfloat16")
    leaves = {
        k: np.zeros((num_layers, num_sets, width, *w.shape), w.dtype) for k, w in one_row.items()
    }
    trained = []
    for a, rows in enumerate(per_adapter, start=1):
        by_layer: dict[int, list[int]] = {}
        for li, e in sorted(rows):
            slot = len(by_layer.setdefault(li, []))
            by_layer[li].append(e)
            ids[li, a, slot] = e
            for k, value in rows[li, e].items():
                leaves[k][li, a, slot] = value
        trained.append(by_layer)
    override = {k: jnp.asarray(v) for k, v in {"ids": ids, **leaves}.items()}  # on device once
    return AdapterBank(tuple(adapters), override, tuple(trained), tuple(profiles))


def _profile(cfg: ModelConfig, config_file: Path, metadata: dict) -> dict | None:
    """The adapter's "routing_profile", checked against the model's MoE layers (None if absent)."""
    if metadata.get("routing_profile") is None:
        return None
    where = f"{config_file}: routing_profile"
    return check_profile(metadata["routing_profile"], where, cfg.moe_layer_ids, CheckpointError)

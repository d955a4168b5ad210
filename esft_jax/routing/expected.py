"""An adapter's routing profile: the coverage its selection has on the data it was selected from.

Coverage (serve/monitor.py) is the share of the routed gate mass (the router's top-k weights, summed
over tokens and their k choices) that lands on the trained experts. Over the profiled data that is, per
MoE layer l, gate_sum[l, selected].sum() / gate_sum[l].sum(), and over all layers the sum of hits
over the sum of mass. The profile travels with the adapter (expert config -> adapter_config.json),
so a server can compare a request's coverage with what the adapter's own task gives:

    {"layers": [1, 2, ...], "per_layer": [0.61, ...], "total": 0.58, "tokens": 32768}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from esft_jax.routing.stats import RoutingStats

PROFILE_KEYS = ("layers", "per_layer", "total", "tokens")


def expected_coverage(stats: RoutingStats, experts: Mapping[int, Sequence[int]]) -> dict:
    """The profile of selecting `experts` (model layer -> expert ids) given `stats`: JSON-ready."""
    if stats.tokens == 0:
        raise ValueError("routing statistics hold no tokens")
    gate_le = np.asarray(stats.gate_sum, np.float64)
    hit_l = np.array(
        [gate_le[i, list(experts.get(layer, []))].sum() for i, layer in enumerate(stats.layers)]
    )
    mass_l = gate_le.sum(axis=1)
    share_l = np.divide(hit_l, mass_l, out=np.zeros_like(hit_l), where=mass_l > 0)
    total = hit_l.sum() / mass_l.sum() if mass_l.sum() > 0 else 0.0
    # a selection of every expert sums the same numbers in another order: clip the last bit
    return {
        "layers": [int(layer) for layer in stats.layers],
        "per_layer": np.clip(share_l, 0.0, 1.0).tolist(),
        "total": float(min(max(total, 0.0), 1.0)),
        "tokens": int(stats.tokens),
    }


def _share(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0.0 <= value <= 1.0
    )


def check_profile(
    obj: object,
    where: str,
    layers: Sequence[int] | None = None,
    error: type[Exception] = ValueError,
) -> dict:
    """`obj` as a profile (floats for the shares), or `error` naming `where` and the bad key; with
    `layers` (the model's MoE layer numbers) its layers must be exactly those."""
    if not isinstance(obj, dict) or set(obj) != set(PROFILE_KEYS):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise error(f"{where}: expected an object with keys {list(PROFILE_KEYS)}, got {got}")
    got_layers, per_layer = obj["layers"], obj["per_layer"]
    if not isinstance(got_layers, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in got_layers
    ):
        raise error(f"{where}: 'layers' must be a list of layer numbers")
    if len(set(got_layers)) != len(got_layers):
        raise error(f"{where}: 'layers' lists a layer twice")
    if layers is not None and sorted(got_layers) != sorted(layers):
        raise error(
            f"{where}: 'layers' {got_layers} are not the model's MoE layers {sorted(layers)}"
        )
    if not isinstance(per_layer, list) or len(per_layer) != len(got_layers):
        raise error(f"{where}: 'per_layer' must be a list of one share per layer")
    bad = [x for x in [*per_layer, obj["total"]] if not _share(x)]
    if bad:
        raise error(f"{where}: coverage shares must be numbers in [0, 1], got {bad[0]!r}")
    tokens = obj["tokens"]
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise error(f"{where}: 'tokens' must be a non-negative integer, got {tokens!r}")
    return {
        "layers": list(got_layers),
        "per_layer": [float(x) for x in per_layer],
        "total": float(obj["total"]),
        "tokens": tokens,
    }

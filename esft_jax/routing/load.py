"""Per-layer expert load: how many of a batch's top-k assignments each expert received."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def expert_counts(expert_ids_lbtk: jax.Array, mask_bt: jax.Array, num_experts: int) -> jax.Array:
    """[L, E] int32: top-k assignments per expert over the tokens where mask is true."""
    onehot = jax.nn.one_hot(expert_ids_lbtk, num_experts, dtype=jnp.int32)  # [L, B, T, k, E]
    return jnp.einsum("lbtke,bt->le", onehot, mask_bt.astype(jnp.int32))


def load_table(counts_le: np.ndarray, layer_ids: Sequence[int], top: int = 4) -> str:
    """A markdown table: per MoE layer (row li is model layer layer_ids[li]), the busiest experts,
    how many were used, imbalance and entropy."""
    counts_le = np.asarray(counts_le, np.float64)
    num_experts = counts_le.shape[1]
    rows = [
        "| layer | busiest experts (share of assignments) | experts used | max/mean load | "
        "entropy / log E |",
        "|---:|---|---:|---:|---:|",
    ]
    for li, counts in enumerate(counts_le):
        share = counts / max(counts.sum(), 1.0)
        busiest = np.argsort(-share, kind="stable")[:top]
        nonzero = share[share > 0]
        entropy = float(-(nonzero * np.log(nonzero)).sum() / np.log(num_experts))
        rows.append(
            f"| {layer_ids[li]} | "
            + ", ".join(f"{e} ({share[e]:.1%})" for e in busiest)
            + f" | {int((counts > 0).sum())}/{num_experts}"
            + f" | {share.max() * num_experts:.2f} | {entropy:.3f} |"
        )
    return "\n".join(rows)

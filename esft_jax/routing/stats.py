"""Routing statistics of a model on a task: the sufficient statistics of every ESFT score.

Per MoE layer and expert, summed over sequences s with n_s counted tokens:
- counts:         number of tokens whose top-k contains the expert
- gate_sum:       sum of the expert's gate weights over those tokens
- seq_count_frac: sum_s counts_s / n_s      (for the paper's mean over sequences of per-sequence means)
- seq_gate_frac:  sum_s gate_sum_s / n_s
- coactivation:   [E, E] tokens whose top-k contains both experts (for grouping experts)
plus the totals `tokens` and `sequences`. Sums are float64 and accumulated in sequence order, so
the result does not depend on how sequences were batched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class RoutingStats:
    layers: list[int]  # model layer number of each row (e.g. 1..26 for DeepSeek-V2-Lite)
    num_experts: int
    top_k: int
    counts: np.ndarray  # [L, E] int64
    gate_sum: np.ndarray  # [L, E] float64
    seq_count_frac: np.ndarray  # [L, E] float64
    seq_gate_frac: np.ndarray  # [L, E] float64
    coactivation: np.ndarray  # [L, E, E] int64
    tokens: int = 0
    sequences: int = 0

    @classmethod
    def empty(cls, layers: list[int], num_experts: int, top_k: int) -> RoutingStats:
        le = (len(layers), num_experts)
        return cls(
            list(layers),
            num_experts,
            top_k,
            np.zeros(le, np.int64),
            np.zeros(le),
            np.zeros(le),
            np.zeros(le),
            np.zeros((*le, num_experts), np.int64),
        )

    def add(
        self,
        counts_sle: np.ndarray,
        gate_sle: np.ndarray,
        tokens_s: np.ndarray,
        coactivation_lee: np.ndarray,
    ) -> None:
        """Add S sequences: their per-sequence counts and gate sums [S, L, E] and token counts [S];
        sequences with no counted token are ignored."""
        keep = np.asarray(tokens_s) > 0
        counts = np.asarray(counts_sle, np.int64)[keep]
        gates = np.asarray(gate_sle, np.float64)[keep]
        n = np.asarray(tokens_s, np.float64)[keep][:, None, None]
        for s in range(counts.shape[0]):  # in sequence order: independent of batching
            self.counts += counts[s]
            self.gate_sum += gates[s]
            self.seq_count_frac += counts[s] / n[s]
            self.seq_gate_frac += gates[s] / n[s]
        self.coactivation += np.asarray(coactivation_lee, np.int64)
        self.tokens += int(n.sum())
        self.sequences += int(keep.sum())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingStats:
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
        scalars = {"num_experts", "top_k", "tokens", "sequences"}
        return cls(
            **{
                k: (int(v) if k in scalars else v.tolist() if k == "layers" else v)
                for k, v in d.items()
            }
        )

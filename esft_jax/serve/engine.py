"""Greedy generation for a batch of requests over any mix of adapters and the base model.

Every request names its model (an adapter of the bank, or None for the base); the batch runs as one
generation (eval/generate.py: KV cache, one compiled decode step) whose params carry the bank's
expert overrides and each row's set index, so a request gets exactly what it gets alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from esft_jax.eval.generate import generate, padded_rows
from esft_jax.model.config import ModelConfig
from esft_jax.model.params import Params
from esft_jax.serve.bank import BASE, AdapterBank, build_bank
from esft_jax.serve.monitor import Coverage, coverage


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: Sequence[int]  # token ids, BOS included where the model has one
    model: str | None = None  # an adapter's name; None: the base model
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


class Engine:
    """One base model (`params`, on `mesh` if given) and the adapters `adapters` (name -> directory)."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        adapters: Mapping[str, str | Path],
        *,
        mesh: Mesh | None = None,
    ):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.bank: AdapterBank = build_bank(cfg, params, adapters)

    def generate(self, requests: Sequence[Request]) -> list[list[int]]:
        """Each request's continuation (up to and excluding EOS, at most its max_tokens): greedy, or
        sampled with its temperature, top_p and seed (the same tokens whatever shares the batch)."""
        # Rows and new tokens rounded up to powers of two: a few compilations serve every batch.
        rows = padded_rows(_power_of_two(len(requests)), self.cfg, self.mesh)
        empty = rows - len(requests)  # rows without a prompt: done from the start
        sets_b = np.array([self.bank.index(r.model) for r in requests] + [BASE] * empty, np.int32)
        eos = self.cfg.eos_token_id if self.cfg.eos_token_id is not None else -1
        outs = generate(
            self.bank.params_for(self.params, sets_b),
            self.cfg,
            [r.prompt for r in requests] + [[]] * empty,
            max_new_tokens=_power_of_two(max(r.max_tokens for r in requests)),
            eos_id=eos,
            mesh=self.mesh,
            sampling=[(r.temperature, r.top_p, r.seed) for r in requests] + [(0.0, 1.0, 0)] * empty,
        )
        return [out[: r.max_tokens] for out, r in zip(outs, requests)]

    def coverage(
        self, requests: Sequence[Request], outputs: Sequence[Sequence[int]]
    ) -> list[Coverage]:
        """Per request, the share of its routed gate mass (prompt and output) on its adapter's
        trained experts (serve/monitor.py); 0 for the base model."""
        sets = [self.bank.index(r.model) for r in requests]
        sequences = [[*r.prompt, *out] for r, out in zip(requests, outputs)]
        return coverage(self.params, self.cfg, self.bank, sets, sequences, self.mesh)


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()

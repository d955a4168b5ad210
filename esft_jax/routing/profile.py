"""Profiling: run a model over a task's data and accumulate its routing statistics.

Sequences come from a grain pipeline (shuffle with a seed, tokenise), one document per row, cut to
`seq_len`, and the stream is cut so that exactly `token_budget` counted tokens are profiled. A
jitted step turns each batch's routing into per-sequence counts and gate sums [B, L, E] and a
co-activation matrix [L, E, E]; the host adds them up in sequence order (routing/stats.py), so the
result does not depend on the batch size or the device count.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tokenizers import Tokenizer
from tqdm import tqdm

from esft_jax import sharding
from esft_jax.data.shards import global_max, plan as plan_shards
from esft_jax.data.records import Sample
from esft_jax.data.tokenize import encode
from esft_jax.model import ModelConfig, forward, param_axes
from esft_jax.routing.official_logs import OfficialLogWriter
from esft_jax.routing.stats import RoutingStats

COUNT_MODES = ("all", "answer", "prompt")


@dataclasses.dataclass(frozen=True)
class Sequence:
    ids: np.ndarray  # [n] int32 tokens the model reads
    counted: np.ndarray  # [n] bool: tokens whose routing is counted


def sequences(samples: list[Sample], tokenizer: Tokenizer, cfg: ModelConfig, *, seq_len: int,
              token_budget: int, seed: int = 0, count: str = "all", shard: tuple[int, int] = (0, 1)
              ) -> list[Sequence]:
    """Shuffled, tokenised, truncated documents holding exactly `token_budget` counted tokens
    (or all the data's, if it holds fewer). shard = (index, n): only every n-th shuffled document from
    `index` on, and that shard's part of the budget (data/shards.py)."""
    if count not in COUNT_MODES:
        raise ValueError(f"count={count!r}: expected one of {COUNT_MODES}")
    index, n = shard
    token_budget = token_budget * (index + 1) // n - token_budget * index // n

    def tokenise(sample: Sample) -> Sequence:
        ids, answer = encode(tokenizer, sample, cfg.bos_token_id, cfg.eos_token_id)
        counted = {"all": np.ones_like(answer), "answer": answer, "prompt": ~answer}[count]
        return Sequence(ids[:seq_len], counted[:seq_len])

    dataset = grain.MapDataset.source(samples).shuffle(seed=seed)[index::n].map(tokenise)
    out, remaining = [], token_budget
    for seq in dataset:
        if remaining <= 0:
            break
        if not seq.counted.any():  # nothing to count (e.g. an answer cut off by seq_len)
            continue
        cum = np.cumsum(seq.counted)
        if cum.size and cum[-1] > remaining:  # cut right after the budget's last token
            end = int(np.searchsorted(cum, remaining)) + 1
            seq = Sequence(seq.ids[:end], seq.counted[:end])
        remaining -= int(seq.counted.sum())
        out.append(seq)
    return out


def _rows(seqs: list[Sequence], rows: int, seq_len: int) -> tuple[np.ndarray, ...]:
    """(tokens, segment_ids, counted) [rows, seq_len]; padding rows/tokens have segment 0."""
    tokens = np.zeros((rows, seq_len), np.int32)
    segments = np.zeros((rows, seq_len), np.int32)
    counted = np.zeros((rows, seq_len), bool)
    for row, seq in enumerate(seqs):
        n = seq.ids.size
        tokens[row, :n], segments[row, :n], counted[row, :n] = seq.ids, 1, seq.counted
    return tokens, segments, counted


def _local_batches(local: dict[int, list[Sequence]], rows: int, seq_len: int
                   ) -> Iterator[tuple[np.ndarray, ...]]:
    """This process's rows of each batch: its shards' sequences side by side, `rows` per shard, for
    as many batches as the longest shard of any process needs."""
    n_batches = global_max(max(-(-len(seqs) // rows) for seqs in local.values()))
    for b in range(n_batches):
        parts = [_rows(seqs[b * rows:(b + 1) * rows], rows, seq_len) for seqs in local.values()]
        yield tuple(np.concatenate(arrays) for arrays in zip(*parts))


def _step(params, tokens, segments, counted, cfg: ModelConfig, with_routing: bool):
    _, routing = forward(params, tokens, cfg, segment_ids_bt=segments)
    e = cfg.n_routed_experts
    mask = counted.astype(jnp.float32)
    chosen_lbte = gate_lbte = 0.0  # summed over the k choices one at a time: no [L, B, T, k, E] array
    for j in range(cfg.num_experts_per_tok):
        hot = jax.nn.one_hot(routing.expert_ids[..., j], e, dtype=jnp.float32)
        chosen_lbte = chosen_lbte + hot
        gate_lbte = gate_lbte + hot * routing.gate_weights[..., j, None]
    out = {
        "tokens_b": counted.sum(1),
        "counts_ble": jnp.einsum("lbte,bt->ble", chosen_lbte, mask),
        "gates_ble": jnp.einsum("lbte,bt->ble", gate_lbte, mask),
        "coact_lee": jnp.einsum("lbte,lbtf,bt->lef", chosen_lbte, chosen_lbte, mask),
    }
    if with_routing:
        out.update(expert_ids=routing.expert_ids, gate_weights=routing.gate_weights)
    return out


def profile(params: Any, cfg: ModelConfig, seqs: list[Sequence] | Callable[[int, int], list[Sequence]], *,
            batch_size: int, seq_len: int, mesh: Mesh | None = None, shards: int = 0,
            log_writer: OfficialLogWriter | None = None, progress: bool = True) -> RoutingStats:
    """Routing statistics on `mesh` (batch over data/fsdp, experts over expert) if given. `seqs`: all
    the sequences, or a reader of shard (index, count) (`sequences(..., shard=...)`); with a reader each
    process reads only the data shards under its batch rows (`shards` of them, 0: one per block of
    rows a process holds), so the statistics depend on the shard count, not on the process count."""
    layers = list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
    stats = RoutingStats.empty(layers, cfg.n_routed_experts, cfg.num_experts_per_tok)
    step = jax.jit(_step, static_argnums=(4, 5))
    rows_sharding = None
    if mesh is not None:
        params = sharding.shard_params(params, param_axes(cfg), mesh)
        rows_sharding = NamedSharding(mesh, sharding.logical_to_spec(("act_batch", None), dict(mesh.shape)))
    plan = plan_shards(rows_sharding, batch_size, 1 if isinstance(seqs, list) else shards, key="--config.shards")
    local = {0: seqs} if isinstance(seqs, list) else {i: seqs(i, plan.count) for i in plan.local}
    bar = tqdm(total=sum(int(s.counted.sum()) for part in local.values() for s in part), unit="tok",
               desc="profiling", disable=not progress)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for tokens, segments, counted in _local_batches(local, plan.rows, seq_len):
            batch = sharding.from_process_rows((tokens, segments, counted), rows_sharding, (batch_size, seq_len))
            out = sharding.to_host(step(params, *batch, cfg, log_writer is not None))
            n_s = out["tokens_b"]
            stats.add(np.rint(out["counts_ble"]), out["gates_ble"], n_s, np.rint(out["coact_lee"]))
            if log_writer is not None:  # single-process: `counted` holds every row
                for row in np.flatnonzero(n_s):
                    keep = counted[row]
                    log_writer.add(out["expert_ids"][:, row][:, keep], out["gate_weights"][:, row][:, keep])
            bar.update(int(counted.sum()))
    bar.close()
    return stats

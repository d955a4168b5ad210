"""Profiling: run a model over a task's data and accumulate its routing statistics.

Sequences come from a grain pipeline (shuffle with a seed, tokenise), one per document, cut to
`seq_len`, and the stream is cut so that exactly `token_budget` counted tokens are profiled.

Documents are packed, in that order, into rows of `row_len` = the power of two that holds the
longest document (at most `seq_len`): a row takes the next document while it fits, else a new row
starts (`pack`). Segment ids 1, 2, ... keep a row's documents apart (attention stays inside a
document, rotary positions restart at each), so every document is routed as if alone; short rows
keep attention, which is quadratic in the row length, from costing more than the documents need.
A batch holds `batch_size * (seq_len // row_len)` rows: the same token positions as batch_size rows
of seq_len. The jitted step returns each row's statistics per packed document, counts and gate sums
[B, S, L, E] (S: the most documents a row holds), plus a co-activation matrix [L, E, E]; the host
adds the documents up in document order (routing/stats.py). The packing depends only on the
documents (of each data shard, data/shards.py), never on the batch size, the mesh or the number of
processes, and so do the statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from tokenizers import Tokenizer
from tqdm import tqdm

from esft_jax import sharding
from esft_jax.data.chat import ChatTemplate
from esft_jax.data.records import Sample
from esft_jax.data.shards import global_max
from esft_jax.data.shards import plan as plan_shards
from esft_jax.data.tokenize import encode
from esft_jax.model import ModelConfig, forward
from esft_jax.routing.official_logs import OfficialLogWriter
from esft_jax.routing.stats import RoutingStats

COUNT_MODES = ("all", "answer", "prompt")


@dataclasses.dataclass(frozen=True)
class Sequence:
    ids: np.ndarray  # [n] int32 tokens the model reads
    counted: np.ndarray  # [n] bool: tokens whose routing is counted


def sequences(
    samples: list[Sample],
    tokenizer: Tokenizer,
    cfg: ModelConfig,
    *,
    seq_len: int,
    token_budget: int,
    seed: int = 0,
    count: str = "all",
    shard: tuple[int, int] = (0, 1),
    template: ChatTemplate | None = None,
) -> list[Sequence]:
    """Shuffled, tokenised, truncated documents holding exactly `token_budget` counted tokens
    (or all the data's, if it holds fewer). shard = (index, n): only every n-th shuffled document from
    `index` on, and that shard's part of the budget (data/shards.py). Conversations are rendered by
    `template` (None: ESFT's format) as training renders them, "answer" their assistant turns."""
    if count not in COUNT_MODES:
        raise ValueError(f"count={count!r}: expected one of {COUNT_MODES}")
    index, n = shard
    token_budget = token_budget * (index + 1) // n - token_budget * index // n

    def tokenise(sample: Sample) -> list[Sequence]:
        documents = []
        for ids, answer in encode(tokenizer, sample, cfg, template):
            counted = {"all": np.ones_like(answer), "answer": answer, "prompt": ~answer}[count]
            documents.append(Sequence(ids[:seq_len], counted[:seq_len]))
        return documents

    dataset = grain.MapDataset.source(samples).shuffle(seed=seed)[index::n].map(tokenise)
    out, remaining = [], token_budget
    for seq in (seq for documents in dataset for seq in documents):
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


def row_length(seqs: list[Sequence], seq_len: int) -> int:
    """The power of two that holds the longest of `seqs`, at most `seq_len`."""
    longest = max((s.ids.size for s in seqs), default=1)
    return min(seq_len, 1 << max(longest - 1, 0).bit_length())


def pack(seqs: list[Sequence], row_len: int) -> list[list[Sequence]]:
    """The documents, in order, as rows of at most `row_len` tokens: a row takes the next document
    while it fits, else the next row starts with it."""
    if any(s.ids.size > row_len for s in seqs):
        raise ValueError(f"a document is longer than row_len={row_len}")
    rows: list[list[Sequence]] = []
    used = row_len
    for seq in seqs:
        if used + seq.ids.size > row_len:
            rows.append([])
            used = 0
        rows[-1].append(seq)
        used += seq.ids.size
    return rows


def _rows(packed: list[list[Sequence]], rows: int, row_len: int) -> tuple[np.ndarray, ...]:
    """(tokens, segment_ids, counted) [rows, row_len]: a row's documents have segments 1, 2, ...;
    padding rows/tokens have segment 0."""
    tokens = np.zeros((rows, row_len), np.int32)
    segments = np.zeros((rows, row_len), np.int32)
    counted = np.zeros((rows, row_len), bool)
    for row, docs in enumerate(packed):
        start = 0
        for segment, seq in enumerate(docs, 1):
            span = slice(start, start + seq.ids.size)
            tokens[row, span], segments[row, span], counted[row, span] = (
                seq.ids,
                segment,
                seq.counted,
            )
            start = span.stop
    return tokens, segments, counted


def _local_batches(
    local: dict[int, list[list[Sequence]]], rows: int, row_len: int
) -> Iterator[tuple[np.ndarray, ...]]:
    """This process's rows of each batch: its shards' packed rows side by side, `rows` per shard, for
    as many batches as the longest shard of any process needs."""
    n_batches = global_max(max(-(-len(packed) // rows) for packed in local.values()))
    for b in range(n_batches):
        parts = [
            _rows(packed[b * rows : (b + 1) * rows], rows, row_len) for packed in local.values()
        ]
        yield tuple(np.concatenate(arrays) for arrays in zip(*parts))


def _step(params, tokens, segments, counted, cfg: ModelConfig, max_docs: int, with_routing: bool):
    _, routing = forward(params, tokens, cfg, segment_ids_bt=segments)
    e = cfg.n_routed_experts
    mask = counted.astype(jnp.float32)
    # padding: no document
    doc_bts = jax.nn.one_hot(segments - 1, max_docs, dtype=jnp.float32) * mask[..., None]
    # summed over the k choices one at a time: no [L, B, T, k, E] array
    chosen_lbte = gate_lbte = 0.0
    for j in range(cfg.num_experts_per_tok):
        hot = jax.nn.one_hot(routing.expert_ids[..., j], e, dtype=jnp.float32)
        chosen_lbte = chosen_lbte + hot
        gate_lbte = gate_lbte + hot * routing.gate_weights[..., j, None]
    exact = jax.lax.Precision.HIGHEST  # float32 sums also where matmuls default to bf16 (TPU)
    out = {
        "tokens_bs": doc_bts.sum(1),
        "counts_bsle": jnp.einsum("lbte,bts->bsle", chosen_lbte, doc_bts, precision=exact),
        "gates_bsle": jnp.einsum("lbte,bts->bsle", gate_lbte, doc_bts, precision=exact),
        "coact_lee": jnp.einsum(
            "lbte,lbtf,bt->lef", chosen_lbte, chosen_lbte, mask, precision=exact
        ),
    }
    if with_routing:
        out.update(expert_ids=routing.expert_ids, gate_weights=routing.gate_weights)
    return out


def _per_doc(x_bs: np.ndarray) -> np.ndarray:
    """[B, S, ...] -> [B * S, ...]: one row per packed document (empty ones too)."""
    return x_bs.reshape(x_bs.shape[0] * x_bs.shape[1], *x_bs.shape[2:])


def collect(
    params: Any,
    cfg: ModelConfig,
    seqs: list[Sequence] | Callable[[int, int], list[Sequence]],
    *,
    batch_size: int,
    seq_len: int,
    mesh: Mesh | None = None,
    shards: int = 0,
    log_writer: OfficialLogWriter | None = None,
    progress: bool = True,
) -> RoutingStats:
    """Routing statistics on `mesh` (batch over data/fsdp, experts over expert) if given, with
    `params` placed on it (runtime.load_model). `seqs`: all
    the sequences, or a reader of shard (index, count) (`sequences(..., shard=...)`); with a reader each
    process reads only the data shards under its batch rows (`shards` of them, 0: one per block of
    rows a process holds), so the statistics depend on the shard count, not on the process count.
    Documents are packed into rows of `row_length(...)` (module docstring)."""
    layers = list(cfg.moe_layer_ids)
    stats = RoutingStats.empty(layers, cfg.n_routed_experts, cfg.num_experts_per_tok)
    step = jax.jit(_step, static_argnames=("cfg", "max_docs", "with_routing"))
    rows_sharding = None
    if mesh is not None:
        rows_sharding = NamedSharding(
            mesh, sharding.logical_to_spec(("act_batch", None), dict(mesh.shape))
        )
    plan = plan_shards(
        rows_sharding, batch_size, 1 if isinstance(seqs, list) else shards, key="--config.shards"
    )
    local = {0: seqs} if isinstance(seqs, list) else {i: seqs(i, plan.count) for i in plan.local}
    # every process packs alike: the row length and the documents per row are maxima over all processes
    row_len = global_max(row_length([s for part in local.values() for s in part], seq_len))
    packed = {i: pack(part, row_len) for i, part in local.items()}
    max_docs = global_max(max((len(docs) for part in packed.values() for docs in part), default=1))
    rows_per_seq_len = seq_len // row_len
    bar = tqdm(
        total=sum(int(s.counted.sum()) for part in local.values() for s in part),
        unit="tok",
        desc="profiling",
        disable=not progress,
    )
    with sharding.on_mesh(mesh):
        for tokens, segments, counted in _local_batches(
            packed, plan.rows * rows_per_seq_len, row_len
        ):
            batch = sharding.from_process_rows(
                (tokens, segments, counted), rows_sharding, (batch_size * rows_per_seq_len, row_len)
            )
            out = sharding.to_host(step(params, *batch, cfg, max_docs, log_writer is not None))
            n_s = out["tokens_bs"].reshape(-1)
            stats.add(
                np.rint(_per_doc(out["counts_bsle"])),
                _per_doc(out["gates_bsle"]),
                n_s,
                np.rint(out["coact_lee"]),
            )
            if log_writer is not None:  # single-process: `counted` holds every row
                for row, segment in zip(*np.nonzero(out["tokens_bs"])):
                    keep = counted[row] & (segments[row] == segment + 1)
                    log_writer.add(
                        out["expert_ids"][:, row][:, keep], out["gate_weights"][:, row][:, keep]
                    )
            bar.update(int(counted.sum()))
    bar.close()
    return stats

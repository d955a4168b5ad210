"""The routing steps of ESFT from their configs, as `esft profile` / `esft select` run them and
`esft run` does for each study: profile a model's routing on a task, select experts from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections

from esft_jax.app import checks, config_files, runtime
from esft_jax.app.checks import (
    input_path,
    one_of,
    template,
    whole,
    writable_dir,
)
from esft_jax.app.commands import profile as routing_run
from esft_jax.data.records import DataError
from esft_jax.data.sources import FORMATS, read_samples
from esft_jax.routing import profile, scores
from esft_jax.routing.official_logs import OfficialLogWriter
from esft_jax.routing.profile import COUNT_MODES
from esft_jax.routing.sources import STATS_FILE
from esft_jax.routing.stats import RoutingStats

SUMMARY_FILE = "summary.json"


class Profiled(NamedTuple):
    stats: RoutingStats | None  # None on every process but the first (which writes the files)
    samples: int  # samples in the dataset
    skipped: int  # malformed rows skipped (c.skip_invalid)


def profile_routing(c: ml_collections.ConfigDict) -> Profiled:
    """Profile c.data's routing (configs/profile.py); write <out_dir>/stats.npz, summary.json and,
    with c.official_logs, the official logs in <out_dir>/logs."""
    runtime.distributed(c)
    mesh = runtime.mesh(c)
    cfg, params = runtime.load_model(c, mesh)
    checks.within_positions(c, "seq_len", cfg)
    samples, skipped = read_samples(c.data, c.skip_invalid, c.data_format)
    tokenizer = runtime.tokenizer(c)
    template = runtime.chat_template(c, "template", tokenizer, cfg)
    if not profile.sequences(  # the first document with a counted token, if any has one
        samples, tokenizer, cfg, seq_len=c.seq_len, token_budget=1, count=c.count, template=template
    ):
        raise DataError(
            f"{c.data}: no sample has a token to count (--config.count={c.count}) within "
            f"--config.seq_len={c.seq_len} tokens; nothing would be profiled"
        )

    def read(index: int, count: int) -> list[profile.Sequence]:  # this process's data shards only
        return profile.sequences(
            samples,
            tokenizer,
            cfg,
            seq_len=c.seq_len,
            token_budget=c.token_budget,
            seed=c.seed,
            count=c.count,
            shard=(index, count),
            template=template,
        )

    out = Path(c.out_dir)
    if c.official_logs and jax.process_count() > 1:
        raise config_files.ConfigFileError("--config.official_logs is single-process only")
    writer = OfficialLogWriter(out / "logs", list(cfg.moe_layer_ids)) if c.official_logs else None
    try:
        stats = profile.collect(
            params,
            cfg,
            read,
            batch_size=c.batch_size,
            seq_len=c.seq_len,
            mesh=mesh,
            shards=c.shards,
            log_writer=writer,
            progress=c.progress,
        )
    finally:
        if writer is not None:
            writer.close()
    if jax.process_index() != 0:  # every process profiles its share of each batch; one writes
        return Profiled(None, len(samples), skipped)
    stats.save(out / STATS_FILE)
    (out / SUMMARY_FILE).write_text(json.dumps(scores.official_summary(stats), indent=1) + "\n")
    return Profiled(stats, len(samples), skipped)


def check(c: ml_collections.ConfigDict) -> None:
    input_path(c, "data", "a dataset to profile")
    if c.adapter:
        input_path(c, "adapter", "an adapter directory (esft train's <workdir>/adapter)")
    one_of(c, "data_format", FORMATS)
    template(c, "template")
    for key in ("token_budget", "batch_size"):
        whole(c, key)
    whole(c, "seq_len", 0)  # 0: resolved against the model (within_positions)
    whole(c, "shards", 0)
    one_of(c, "count", COUNT_MODES)
    writable_dir(c, "out_dir")


def run(c: ml_collections.ConfigDict) -> None:
    """Profile a model's (+ adapter's) routing on a task dataset; write stats.npz and summary.json."""
    profiled = routing_run.profile_routing(c)
    if profiled.skipped:
        print(f"skipped {profiled.skipped} malformed lines of {c.data}")
    if profiled.stats is None:  # not the writing process
        return
    out, stats = Path(c.out_dir), profiled.stats
    print(
        f"profiled {stats.tokens} tokens in {stats.sequences} sequences of {profiled.samples} samples -> "
        f"{out / STATS_FILE}, {out / routing_run.SUMMARY_FILE}"
        + (f", {out / 'logs'}" * c.official_logs)
    )

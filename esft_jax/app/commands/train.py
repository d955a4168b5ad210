"""`esft train`: one flat loop for every training method (train/method.py: ESFT, FFT, LoRA, router,
ESFT-LoRA).

Each step is one call of the jitted train step (train/step.py), which donates the old state. Every
`checkpoint_every` steps the state and the data iterator's position are saved with orbax; rerunning
the same command resumes from the latest checkpoint and reproduces an uninterrupted run exactly
(app/resume.py: what a rerun may change). A non-finite step stops the run before anything is saved
from it (train/guard.py). Ctrl-C stops it with one line naming its step and the checkpoint a rerun
resumes from (app/interrupt.py).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from tokenizers import Tokenizer
from tqdm import tqdm

from esft_jax import sharding
from esft_jax.app import config_files, interrupt, resume, runtime
from esft_jax.app.commands.train_checks import check_with_model
from esft_jax.checkpoint.train_state import TrainCheckpoints, abstract_like
from esft_jax.data.chat import ChatTemplate
from esft_jax.data.pipeline import _encoder, eval_batches, split_validation, train_batches
from esft_jax.data.records import DataError, Sample
from esft_jax.data.shards import LocalBatches
from esft_jax.data.shards import plan as plan_shards
from esft_jax.data.sources import read_samples
from esft_jax.model import ModelConfig, param_axes
from esft_jax.train import guard, routing_profile
from esft_jax.train.method import TrainingMethod, build_method, save_adapter
from esft_jax.train.optimizer import Optim, learning_rate, make_optimizer
from esft_jax.train.settings import MethodSettings
from esft_jax.train.step import make_eval_step, make_train_step, state_shardings


def method_settings(c: ml_collections.ConfigDict) -> MethodSettings:
    """configs/train.py's fields the training methods are built from."""
    return MethodSettings(
        expert_config=c.expert_config,
        lora_rank=c.lora.rank,
        lora_alpha=c.lora.alpha,
        lora_targets=tuple(c.lora.targets.split(",")),
        seed=c.seed,
    )


def optim(c: ml_collections.ConfigDict) -> Optim:
    return Optim(**c.optim.to_dict())


def _shardings(tree_axes: Any, mesh: Mesh | None):
    return None if mesh is None else sharding.param_shardings(tree_axes, mesh)


def _put(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(jnp.asarray, tree) if shardings is None else jax.device_put(tree, shardings)


def _batch_sharding(mesh: Mesh | None, ndim: int):
    if mesh is None:
        return None
    axes = (None,) * (ndim - 2) + ("act_batch", None)
    return NamedSharding(mesh, sharding.logical_to_spec(axes, dict(mesh.shape)))


def _local_batches(
    c: ml_collections.ConfigDict,
    rows_sharding: Any,
    samples: Sequence[Sample],
    general: Sequence[Sample] | None,
    tokenizer: Tokenizer,
    cfg: ModelConfig,
    data_state: dict | None,
    template: ChatTemplate,
) -> LocalBatches:
    """This process's shards of the training batches (data/shards.py), at `data_state` if resuming;
    without --config.data.shards a resumed run keeps its checkpoint's shard count."""
    shards = plan_shards(
        rows_sharding, c.batch_size, c.data.shards or (data_state or {}).get("count", 0)
    )
    if len(samples) < shards.count:
        raise config_files.ConfigFileError(
            f"--config.data.train: {len(samples)} training samples cannot fill "
            f"{shards.count} data shards"
        )
    data = LocalBatches(
        shards,
        lambda index, count: iter(
            train_batches(
                samples,
                tokenizer,
                cfg,
                seq_len=c.data.seq_len,
                batch_size=shards.rows,
                seed=c.seed,
                general=general,
                general_ratio=c.data.general_ratio,
                shard=(index, count),
                template=template,
                loss_on=c.data.loss_on,
            )
        ),
    )
    if data_state is not None:
        data.set_state(data_state)
    return data


def _append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def tree_bytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


class _Data(NamedTuple):
    train: Sequence[Sample]  # read on access (data/sources.py)
    validation: Sequence[Sample]
    general: Sequence[Sample] | None  # mixed in at c.data.general_ratio
    skipped: int  # malformed rows skipped (c.data.skip_invalid)


def _read_data(
    c: ml_collections.ConfigDict, tokenizer: Tokenizer, cfg: ModelConfig, template: ChatTemplate
) -> _Data:
    """The data sets, refused (DataError) if the task's would train no token: with every answer
    cut off by seq_len, a run would save an untrained adapter."""
    samples, skipped = read_samples(c.data.train, c.data.skip_invalid, c.data.format)
    # split the positions, not the samples: both parts stay lazy
    train_at, validation_at = split_validation(
        range(len(samples)), c.data.validation_fraction, c.data.max_validation, c.seed
    )
    train = samples.subset(train_at[: c.data.limit] if c.data.limit else train_at)
    encode = _encoder(tokenizer, cfg, c.data.seq_len, template, c.data.loss_on)
    if not any(doc["loss"].any() for sample in train for doc in encode(sample)):
        raise DataError(
            f"{c.data.train}: no training sample has an answer token within "
            f"--config.data.seq_len={c.data.seq_len} tokens; nothing would train"
        )
    general = None
    if c.data.general:
        general, skipped_general = read_samples(c.data.general, c.data.skip_invalid, c.data.format)
        skipped += skipped_general
    return _Data(train, samples.subset(validation_at), general, skipped)


def _start(
    c: ml_collections.ConfigDict,
    workdir: Path,
    checkpoints: TrainCheckpoints,
    method: TrainingMethod,
    trainable: Any,
) -> tuple[ml_collections.ConfigDict, optax.GradientTransformation, optax.Schedule, dict, int, Any]:
    """(the run's config, optimizer, schedule, state, first step, data position): a new run's, or a
    resumed one's from its latest checkpoint (with the saved settings: app/resume.py)."""
    resuming = checkpoints.latest_step() is not None
    if resuming:
        c = resume.resumed_config(c, workdir, method.expert_config)
    else:
        c = c.copy_and_resolve_references()
    tx, schedule = make_optimizer(optim(c)), learning_rate(optim(c))
    state = jax.device_put(
        {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)},
        state_shardings(tx, trainable),
    )
    if not resuming:
        return c, tx, schedule, state, 0, None
    start, state, data_state = checkpoints.restore(abstract_like(state))
    return c, tx, schedule, state, start, data_state


def _open_metrics(
    c: ml_collections.ConfigDict,
    workdir: Path,
    method: TrainingMethod,
    start: int,
    checkpoints: TrainCheckpoints,
) -> Path:
    """The run files, and metrics.jsonl cut back to the resumed step (or emptied): the primary's."""
    metrics_path = workdir / "metrics.jsonl"
    resume.save_run_files(c, workdir, method.expert_config)
    if start:
        resume.truncate_metrics(metrics_path, start)
        print(f"resuming from step {start} ({checkpoints.directory})")
    else:
        metrics_path.unlink(missing_ok=True)
    return metrics_path


def _log_record(done: int, fetched: list[tuple[int, dict]], since: float) -> dict:
    """One metrics.jsonl line: the last step's metrics, the seconds since the last log, tokens/s."""
    metrics = {k: float(v) for k, v in fetched[-1][1].items() if k != "finite"}
    elapsed = time.perf_counter() - since
    tokens = int(sum(m["tokens"] for _, m in fetched))
    return {
        "step": done,
        **metrics,
        "seconds": elapsed,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
    }


def _validation_loss(
    eval_step: Callable, batches: list, trainable: Any, frozen: Any, rows_sharding: Any
) -> float:
    total, count = 0.0, 0
    for b in batches:
        loss_sum, n = eval_step(trainable, frozen, _put(b, rows_sharding))
        total, count = total + float(loss_sum), count + int(n)
    return total / max(count, 1)


def _step_seconds(history: list[dict]) -> float | None:
    """The median seconds of a step over the logged intervals after the first (which compiles)."""
    steps = [0] + [h["step"] for h in history]
    per_step = [
        h["seconds"] / (step - before)
        for h, step, before in zip(history[1:], steps[2:], steps[1:])
        if step > before
    ]
    return float(np.median(per_step)) if per_step else None


def _summary(
    c: ml_collections.ConfigDict,
    method: TrainingMethod,
    state: dict,
    metrics_path: Path,
    adapter_dir: Path,
    skipped: int,
) -> dict:
    history = [json.loads(ln) for ln in metrics_path.read_text().splitlines()]
    return {
        "method": c.method,
        "steps": c.steps,
        "skipped_lines": skipped,
        "final_loss": history[-1]["loss"] if history else None,
        "val_loss": next((h["val_loss"] for h in reversed(history) if "val_loss" in h), None),
        "trainable_params": method.num_trained(state["trainable"]),
        "optimizer_state_bytes": tree_bytes(state["opt_state"]),
        "adapter_bytes": sum(p.stat().st_size for p in adapter_dir.iterdir()),
        "train_seconds": sum(h["seconds"] for h in history),
        "step_seconds": _step_seconds(history),
        "peak_rss_mb": runtime.peak_rss_bytes() / 1e6,
    }


def train(c: ml_collections.ConfigDict, progress: bool = True) -> dict:
    """Run (or resume) the training described by `c` (configs/train.py); returns a summary ({} on the
    non-primary processes of a multi-process run, which compute but write nothing but checkpoint
    shards). Nothing is written before the values are checked and a resumed run's settings match the
    saved ones."""
    runtime.distributed(c)
    primary = jax.process_index() == 0  # in a multi-process run, one process writes the files
    workdir = Path(c.workdir)
    check_with_model(c, runtime.model_config(c))  # before the weights are read
    mesh = runtime.mesh(c)
    cfg, frozen = runtime.load_model(c, mesh)
    if c.densemixer:  # the router's gradient from the dense mixture (model/router_grad.py)
        cfg = cfg.replace(router_grad="dense")
    tokenizer = runtime.tokenizer(c)
    template = runtime.chat_template(c, "data.template", tokenizer, cfg)
    data_in = _read_data(c, tokenizer, cfg, template)
    method = build_method(c.method, method_settings(c), cfg)
    model_axes = param_axes(cfg)
    trainable = method.init(frozen)
    trainable = _put(trainable, _shardings(method.axes(model_axes, trainable), mesh))
    checkpoints = TrainCheckpoints(workdir / "checkpoints", c.checkpoint_every, c.keep_checkpoints)
    with contextlib.closing(checkpoints):
        c, tx, schedule, state, start, data_state = _start(
            c, workdir, checkpoints, method, trainable
        )
        batch_sharding, eval_sharding = _batch_sharding(mesh, 3), _batch_sharding(mesh, 2)
        data = _local_batches(
            c, eval_sharding, data_in.train, data_in.general, tokenizer, cfg, data_state, template
        )
        global_shape = (c.grad_accum, c.batch_size, c.data.seq_len)
        metrics_path = _open_metrics(c, workdir, method, start, checkpoints) if primary else None
        shardings = state_shardings(tx, state["trainable"])
        train_step = make_train_step(method, cfg, tx, schedule, c.aux_loss_alpha, shardings)
        eval_step = make_eval_step(method, cfg)
        val = eval_batches(
            data_in.validation,
            tokenizer,
            cfg,
            seq_len=c.data.seq_len,
            batch_size=c.batch_size,
            template=template,
            loss_on=c.data.loss_on,
        )
        recent, warned, done = [], set(), start  # recent: (step, metrics) since the last log
        since = time.perf_counter()
        bar = tqdm(
            total=c.steps,
            initial=start,
            desc=f"train {c.method}",
            unit="step",
            disable=not progress,
        )
        stopped = interrupt.explained(lambda: resume.interrupted(done, checkpoints.latest_step()))
        with bar, sharding.on_mesh(mesh), stopped:
            for step in range(start, c.steps):
                batch = sharding.from_process_rows(
                    data.take(c.grad_accum), batch_sharding, global_shape
                )
                state, metrics = train_step(state, frozen, batch)
                done = step + 1
                recent.append((done, metrics))
                evaluate_now = bool(val) and (done % c.eval_every == 0 or done == c.steps)
                if evaluate_now or done % c.log_every == 0 or done == c.steps:
                    record = _log_record(done, guard.check(recent, checkpoints.latest_step), since)
                    guard.warn_if_stalled(done, record, warned)
                    if evaluate_now:
                        record["val_loss"] = _validation_loss(
                            eval_step, val, state["trainable"], frozen, eval_sharding
                        )
                    if primary:
                        _append_metrics(metrics_path, record)
                    bar.set_postfix(
                        {k: f"{record[k]:.4f}" for k in ("loss", "val_loss") if k in record}
                    )
                    since, recent = time.perf_counter(), []
                if checkpoints.due(done, force=done == c.steps):
                    guard.check(recent, checkpoints.latest_step)  # never save after a bad step
                    checkpoints.save(done, state, data.get_state())
                bar.update(1)
        checkpoints.latest_step()  # the last save has committed (or raised) before the adapter is written
    ec = method.expert_config
    profile = None
    if c.profile_tokens and ec is not None and ec.profile is not None:  # one from esft select
        with sharding.on_mesh(mesh):
            served = method.write_back(frozen, state["trainable"])
        profile = routing_profile.measure(
            served,
            cfg,
            ec.experts,
            data_in.train,
            tokenizer,
            template=template,
            tokens=c.profile_tokens,
            seq_len=c.data.seq_len,
            batch_size=c.batch_size,
            seed=c.seed,
            mesh=mesh,
        )
    adapter_dir = save_adapter(
        workdir / "adapter",
        cfg,
        method,
        frozen,
        state["trainable"],
        primary,
        {
            **runtime.adapter_base(c),
            **({"routing_profile": profile} if profile is not None else {}),
        },
    )
    if not primary:
        return {}
    summary = _summary(c, method, state, metrics_path, adapter_dir, data_in.skipped)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run(c: ml_collections.ConfigDict) -> None:
    """Fine-tune with ESFT, FFT or LoRA (resumes from the workdir's checkpoints)."""
    summary = train(c)
    print(json.dumps(summary, indent=1))

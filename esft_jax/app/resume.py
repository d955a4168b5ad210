"""Resuming a workdir: the new command's settings against those saved in <workdir>/config.json.

A rerun resumes from <workdir>/checkpoints only if every setting that changes the result matches
the saved run's: the method and its settings (lora.*, and for esft / esft_lora the selected experts,
compared by content rather than by the expert config's path), the model, checkpoint and tokenizer,
the data, the seed, the batch and the optimizer with its schedule. Settings that only change how or
where the run goes may differ (FREE): the logging, evaluation and checkpoint intervals,
keep_checkpoints, profile_tokens (measured after training), the workdir, the mesh, the process
layout (distributed, data.shards=0 keeps the checkpoint's shards), the MoE strategy, the attention
implementation, scan_layers and remat; the mesh, the MoE strategy and the attention implementation
change only float rounding. With a checkpoint, the model is the checkpoint's: of `model.*` only
dtype and capacity_factor (and router_grad) count. A setting that the saved run's version did not
have yet (a model field, densemixer, data.limit) counts as its default (what that version did).

`steps` may grow only with `extend=True`, which keeps the saved schedule: `optim.steps`, the
schedule's horizon, stays the saved one, so a cosine schedule has reached its final lr there and the
added steps run at that lr (a constant schedule simply goes on).

Every file a rerun reads back is replaced atomically (written beside, then renamed), so a run
killed at any point leaves it whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import ml_collections

from esft_jax.app.config_files import ConfigFileError
from esft_jax.app.runtime import RANDOM_WEIGHTS, RUNTIME_FIELDS
from esft_jax.expert_config import ExpertConfig
from esft_jax.jsonio import read_json
from esft_jax.model import ModelConfig

CONFIG_FILE, EXPERTS_FILE = "config.json", "expert_config.json"
FREE = (
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "profile_tokens",
    "workdir",
    "extend",
    "expert_config",
    "mesh.",
    "distributed.",
    "data.skip_invalid",
    "model.moe_strategy",
    "model.expert_parallel",
    "model.scan_layers",
    "model.remat",
    "model.attention_impl",
    "model.attention_block",
)
PATHS = ("checkpoint", "tokenizer", "data.train", "data.general")  # compared as absolute paths


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: a reader sees the old file or the new, never a part."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _is_free(key: str, checkpoint: str) -> bool:
    if key.startswith("model.") and checkpoint not in (
        "",
        RANDOM_WEIGHTS,
    ):  # the checkpoint's model is used
        return key.removeprefix("model.") not in RUNTIME_FIELDS or _is_free(key, "")
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE)


def _comparable(key: str, value: Any) -> Any:
    return os.path.abspath(value) if key in PATHS and value else value


MODEL_DEFAULTS = {
    f"model.{f.name}": list(f.default) if isinstance(f.default, tuple) else f.default
    for f in dataclasses.fields(ModelConfig)
    if f.default is not dataclasses.MISSING
}
# settings added since the first version: a run saved before had their default
ADDED_DEFAULTS = {**MODEL_DEFAULTS, "densemixer": False, "data.limit": 0}


def _changed(saved: dict[str, Any], new: dict[str, Any], checkpoint: str) -> list[str]:
    """The keys (flattened) that differ and change the result, in the config's order. A model
    field or another setting the saved run lacks (added by a later version: ADDED_DEFAULTS) is
    compared with its default."""
    keys = [*new, *(k for k in saved if k not in new)]
    keys = [
        k for k in keys if not (_is_free(k, checkpoint) or (k == "data.shards" and new.get(k) == 0))
    ]
    saved = {**{k: v for k, v in ADDED_DEFAULTS.items() if k in new}, **saved}
    return [k for k in keys if _comparable(k, saved.get(k)) != _comparable(k, new.get(k))]


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value)


def _shown(config: dict[str, Any], key: str) -> str:
    return _show(config[key]) if key in config else "<unset>"


def _expert_difference(saved: dict, new: dict) -> str | None:
    """'expert_config layer 1 [3, 17] -> [3]' for the first layer whose experts differ; None if equal."""
    if saved == new:
        return None
    layers = sorted({*saved["experts"], *new["experts"]}, key=int)
    differ = [key for key in layers if saved["experts"].get(key) != new["experts"].get(key)]
    if not differ:
        flags = [f for f in ("shared_experts", "non_expert_modules") if saved.get(f) != new.get(f)]
        return ", ".join(
            f"expert_config {f} {_show(saved.get(f))} -> {_show(new.get(f))}" for f in flags
        )
    more = f" (and {len(differ) - 1} more layers)" if len(differ) > 1 else ""
    layer = differ[0]
    return f"expert_config layer {layer} {saved['experts'].get(layer)} -> {new['experts'].get(layer)}{more}"


def resumed_config(
    c: ml_collections.ConfigDict, workdir: Path, expert_config: ExpertConfig | None
) -> ml_collections.ConfigDict:
    """`c` (references resolved) to resume the run saved in `workdir`, with the saved schedule horizon
    when extending; ConfigFileError listing every difference that changes the result."""
    c = c.copy_and_resolve_references()
    path = workdir / CONFIG_FILE
    if not path.is_file():  # a workdir of an older version: nothing to compare with
        print(
            f"warning: {path} is missing: cannot check that the checkpoints were made with these settings",
            file=sys.stderr,
        )
        return c
    saved = _flat(read_json(path, ConfigFileError, "missing"))
    extending = c.extend and c.steps >= saved.get("steps", c.steps)
    if extending:
        c.optim.steps = saved.get("optim.steps", c.optim.steps)
    new = _flat(json.loads(c.to_json_best_effort()))
    changed = [
        key for key in _changed(saved, new, c.checkpoint) if not (extending and key == "steps")
    ]
    differences = [f"{key} {_shown(saved, key)} -> {_shown(new, key)}" for key in changed]
    saved_experts = workdir / EXPERTS_FILE
    if expert_config is not None and saved.get("method") == c.method and saved_experts.is_file():
        experts = _expert_difference(
            read_json(saved_experts, ConfigFileError, "missing"), expert_config.to_json()
        )
        differences += [experts] if experts else []
    if not differences:
        return c
    if (
        not c.extend
        and c.steps >= saved.get("steps", c.steps)
        and {"steps", "optim.steps"} & set(changed)
    ):
        advice = (
            "add --config.extend=True to train on with the saved schedule, "
            "or use another --config.workdir"
        )
    else:
        advice = "use another --config.workdir"
    raise ConfigFileError(
        f"{path}: this workdir holds a run with other settings: {', '.join(differences)}; {advice}"
    )


def save_run_files(
    c: ml_collections.ConfigDict, workdir: Path, expert_config: ExpertConfig | None
) -> None:
    """config.json (and the esft expert config, by content) of a run that has started."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / CONFIG_FILE, c.to_json_best_effort(indent=1) + "\n")
    if expert_config is not None:
        write_atomic(workdir / EXPERTS_FILE, json.dumps(expert_config.to_json()) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records up to the checkpoint being resumed from (the rest will be recomputed); a last
    line cut short by a killed run is dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= last_step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


def interrupted(step: int, checkpoint: int | None) -> str:
    """What `esft train` says when Ctrl-C stops it after `step` steps, its newest checkpoint being
    `checkpoint` (a rerun of the same command goes on from there)."""
    if checkpoint is None:
        return f"interrupted at step {step}, before the first checkpoint; rerun to start again"
    return f"interrupted at step {step}; rerun to resume (from the checkpoint of step {checkpoint})"

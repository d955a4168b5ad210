"""The steps of a study, each its own command's function on a config built from the study's:
`esft profile`, `esft eval` in this process, and the `esft train` command of a method (run as a
child: app/launch.py). Results are cached in the run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import ml_collections

from esft_jax.app import config_files
from esft_jax.app.commands import profile as routing_run
from esft_jax.app.commands.eval import evaluate
from esft_jax.app.runtime import RUNTIME_FIELDS
from esft_jax.data.sources import EXTENSIONS
from esft_jax.train.method import SELECTED_EXPERTS

# the study's, for each of its steps
STEP_FIELDS = (
    "model",
    "checkpoint",
    "tokenizer",
    "template",
    "seed",
    "mesh",
)


def cached(path: Path, compute) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=1) + "\n")
    return value


def step_config(c: ml_collections.ConfigDict, command: str, **fields) -> ml_collections.ConfigDict:
    """configs/<command>.py with the study's model source and `fields` (step config = the command's)."""
    step = config_files.load_file(f"configs/{command}.py")
    for key, value in {**{k: c[k] for k in STEP_FIELDS}, **fields}.items():
        step[key] = value
    return step


def data_path(directory: Path, name: str) -> str:
    """The suite's data set `name` in `directory`: the first of <name>.jsonl, .ndjson, .json,
    .parquet, .arrow or a folder <name> that exists (<name>.jsonl, for the error, if none does)."""
    found = [directory / f"{name}{ext}" for ext in EXTENSIONS] + [directory / name]
    return str(next((p for p in found if p.exists()), found[0]))


def profile_task(c: ml_collections.ConfigDict, suite: Path, out: Path, adapter: str = "") -> None:
    """`esft profile` of the task's training data (by the base model + `adapter`) into `out`."""
    routing_run.profile_routing(
        step_config(
            c,
            "profile",
            adapter=adapter,
            data=data_path(suite / "train", c.task),
            data_format=c.data_format,
            token_budget=c.profile.token_budget,
            seq_len=c.profile.seq_len,
            batch_size=c.profile.batch_size,
            out_dir=str(out),
            progress=False,
        )
    )


def evaluate_model(c: ml_collections.ConfigDict, suite: Path, out: Path, adapter: str = "") -> dict:
    """`esft eval` of the base model (+ adapter) into `out`: task score, general-suite scores and
    held-out perplexity."""
    eval_dir = suite / "eval"
    tasks = ml_collections.ConfigDict(
        {
            name: dict(
                data=data_path(eval_dir, name),
                format=c.data_format,
                limit=c.eval.limit,
                **c.scoring[name].to_dict(),
            )
            for name in [c.task, *c.general_tasks]
        }
    )
    held_out = data_path(eval_dir, c.perplexity_set) if c.perplexity_set else ""
    perplexity = ml_collections.ConfigDict(
        dict(data=held_out, format=c.data_format, seq_len=c.eval.seq_len, limit=0)
    )
    step = step_config(
        c,
        "eval",
        adapter=adapter,
        tasks=tasks,
        perplexity=perplexity,
        judge=c.judge,
        batch_size=c.eval.batch_size,
        out_dir=str(out),
    )
    return evaluate(step).scores


TRAIN_CONFIG = "configs/train.py"


def preset_of(method: str, selections) -> tuple[str, str | None] | None:
    """(the configs/train.py preset, the selection) a study's method names: a preset that takes no
    expert config ("fft", "lora", "router", ...) or <preset>_<selection> for one that trains the
    selected experts ("esft_token", ...); None if it names neither."""
    if method in config_files.presets(TRAIN_CONFIG) and method not in SELECTED_EXPERTS:
        return method, None
    for preset in sorted(SELECTED_EXPERTS, key=len, reverse=True):
        selection = method.removeprefix(f"{preset}_")
        if selection != method and selection in selections:
            return preset, selection
    return None


def train_command(c: ml_collections.ConfigDict, method: str, run: Path, suite: Path) -> list[str]:
    kind, selection = preset_of(method, c.selections)
    train_config = config_files.resolve(TRAIN_CONFIG)
    args = [
        sys.executable,
        "-m",
        "esft_jax.app.cli",
        "train",
        "--config",
        f"{train_config}:{kind}",
        f"--config.checkpoint={c.checkpoint}",
        f"--config.data.train={data_path(suite / 'train', c.task)}",
        f"--config.workdir={run / f'train_{method}'}",
        f"--config.optim.lr={c.lr.get(method, c.lr.get(kind, c.lr.esft))}",
        f"--config.data.template={c.template}",
        f"--config.data.loss_on={c.loss_on}",
        *(f"--config.mesh.{axis}={size}" for axis, size in c.mesh.items() if size != 1),
        # the study's runtime model fields (dtype, strategy, ...), so training runs the model it profiles
        *(f"--config.model.{k}={c.model[k]}" for k in RUNTIME_FIELDS if k in c.model),
        *(f"--config.{override}" for override in c.train),
    ]
    if c.data_format != "auto":
        args.append(f"--config.data.format={c.data_format}")
    if selection is not None:
        args.append(f"--config.expert_config={run / f'experts_{selection}.json'}")
    return args

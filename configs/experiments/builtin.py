"""The ESFT study on the built-in pretrained tiny MoE and one built-in task (`make run`).

    esft run --config configs/experiments/builtin.py:intent      # or :math, :sort
Every method fine-tunes the same model on the same data for the same steps; only what trains differs.
"""

from pathlib import Path

import ml_collections

import esft_jax.builtin
from esft_jax.app import config_blocks as blocks
from esft_jax.app.config_blocks import scoring, selection
from esft_jax.builtin import suite as builtin_suite

BUILTIN_MODEL = str(Path(esft_jax.builtin.__file__).parent / "tiny_moe")

PRESETS = tuple(builtin_suite.DOWNSTREAM)  # the task


def get_config(task: str = "intent") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task
    # general ability: formats the base model was pretrained on
    c.general_tasks = (
        "facts",
        "count",
    )
    blocks.model_source(c)  # with a checkpoint: c.model's runtime fields only
    c.checkpoint = BUILTIN_MODEL
    c.seed = 0
    c.suite_dir = "runs/builtin_suite"  # train/<task>.jsonl and eval/<task>.jsonl (or .json,
    # .parquet, .arrow, a parquet or `datasets` folder <task>)
    c.data_format = "auto"  # of the suite's data: auto (by extension), jsonl, json, parquet, arrow
    # conversations' format in every step (profile, train, eval): "model" (the checkpoint's chat
    # template, else ESFT's), "esft" or a PATH.jinja; loss_on: the trained tokens (esft train's)
    c.template = "model"
    c.loss_on = "assistant"
    c.builtin_suite = True  # write the built-in suite there if it is missing
    c.scoring = ml_collections.ConfigDict(
        {
            name: scoring(scorer, max_new)
            for name, (_, scorer, max_new) in {
                **builtin_suite.DOWNSTREAM,
                **builtin_suite.GENERAL,
            }.items()
        }
    )
    # held-out text for perplexity: <suite_dir>/eval/<name>.jsonl, ... ("" for none)
    c.perplexity_set = "docs"
    c.judge = blocks.judge()
    c.run_dir = f"runs/esft_{task}"
    c.selections = ml_collections.ConfigDict(
        dict(token=selection("token", 0.2), gate=selection("gate", 0.1))
    )
    c.methods = ("fft", "lora", "esft_token", "esft_gate")  # "esft_<selection>"
    c.mesh = blocks.mesh()  # every step's: profile, train, eval
    blocks.launch(c)  # "local", "slurm" or "print" (each method's `esft train` command)
    c.profile = ml_collections.ConfigDict(dict(token_budget=32 * 1024, seq_len=256, batch_size=16))
    # Per-method learning rates (esft: every ESFT variant): few trainable parameters take larger steps.
    c.lr = ml_collections.ConfigDict(dict(fft=1e-3, lora=3e-3, esft=3e-3))
    c.train = (  # --config.<override> for every `esft train`
        "steps=200",
        "batch_size=8",
        "data.seq_len=256",
        "optim.warmup_steps=10",
        "log_every=20",
        "eval_every=200",
        "checkpoint_every=200",
        "data.validation_fraction=0.02",
    )
    c.eval = ml_collections.ConfigDict(dict(limit=60, batch_size=30, seq_len=512))
    # routing drift (routing/drift.py) of these methods: the task profiled again after fine-tuning
    c.drift = ml_collections.ConfigDict(dict(methods=(), score="token", p=0.2))
    return c

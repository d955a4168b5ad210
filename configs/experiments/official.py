"""The ESFT study on the official datasets (../shared/esft-reference/datasets, or $ESFT_REFERENCE/datasets)
with a real checkpoint, e.g. ESFT-vanilla-lite on a GPU/TPU mesh:

    esft run --config configs/experiments/official.py:intent --config.checkpoint=/models/ESFT-vanilla-lite \\
        --config.train="('mesh.expert=8', 'model.dtype=bfloat16')" --config.launch=print
    # here, with the built-in small model and a tiny budget:
    esft run --config configs/experiments/official.py:intent --config.checkpoint=esft_jax/builtin/tiny_moe \\
        --config.eval.limit=20 --config.train="('steps=20', 'batch_size=4', 'data.seq_len=1024')"

Tasks with training data: intent, law. Training follows the paper (configs/train.py: 500 steps, batch
32 x 4096, lr 1e-5). Intent is scored by the official metric; the other eval sets by chrF against
their reference answers, a local proxy for the LLM judge of the original work:
`--config.scoring.law.scorer=judge --config.judge.base_url=http://host:8000/v1 --config.judge.model=...`.
General ability here = the other eval sets (the paper's general benchmarks are not available offline).
"""

import os
from pathlib import Path

import ml_collections

from esft_jax.app import config_blocks as blocks
from esft_jax.app.config_blocks import scoring
from esft_jax.app.config_files import load_file

# eval sets; intent and law also have training data
TASKS = (
    "intent",
    "law",
    "summary",
    "translation",
)

PRESETS = ("intent", "law")  # the tasks with training data


def get_config(task: str = "intent") -> ml_collections.ConfigDict:
    # then this task (law is no built-in task)
    c = load_file(str(Path(__file__).with_name("builtin.py")))
    c.task = task
    c.checkpoint = ""  # a Hugging Face checkpoint directory: required
    c.model = blocks.model("esft_vanilla_lite")  # runtime fields only
    c.template = "esft"  # the official training format, whatever template the checkpoint carries
    reference = os.environ.get(
        "ESFT_REFERENCE", str(Path(__file__).parents[2] / ".." / "shared" / "esft-reference")
    )
    c.suite_dir = str(Path(reference) / "datasets")
    c.builtin_suite = False
    c.general_tasks = tuple(t for t in TASKS if t != task)
    c.scoring = ml_collections.ConfigDict(
        {t: scoring("chrf", 256, stop="\n\nUser:") for t in TASKS}
    )
    c.scoring.intent = scoring("intent", 128, stop="\n\nUser:")
    c.perplexity_set = ""
    c.run_dir = f"runs/official_{task}"
    c.lr = ml_collections.ConfigDict(dict(fft=1e-5, lora=1e-4, esft=1e-5))
    c.train = ()  # --config.<override> for every `esft train`, e.g. the mesh
    c.eval = ml_collections.ConfigDict(dict(limit=0, batch_size=4, seq_len=4096))
    c.profile = ml_collections.ConfigDict(dict(token_budget=32 * 1024, seq_len=4096, batch_size=4))
    return c

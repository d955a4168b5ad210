"""ESFT with little data: the built-in study at several training-set sizes, then one table.

    esft run --config configs/experiments/small_data.py              # intent
    esft run --config configs/experiments/small_data.py:math --config.variant_devices=2

Each study trains ESFT-Token, ESFT-Gate, esft_lora (ESFT-Token's experts), LoRA and FFT on the first
N samples of the task's training set (data.limit: the sizes are nested), evaluated alike; the table
gives each size's task score and the general ability retained. The built-in suite has 2,000
training samples a task; on larger data (e.g. the official sets) add sizes here.
"""

from pathlib import Path

import ml_collections

from esft_jax.app import config_blocks as blocks
from esft_jax.app.config_files import load_file
from esft_jax.builtin import suite as builtin_suite

PRESETS = tuple(builtin_suite.DOWNSTREAM)  # the task
SIZES = (250, 500, 1000, 2000)


def get_config(task: str = "intent") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = f"runs/small_data_{task}"
    blocks.launch(c)  # every study's variants train together, as this says
    c.merge = ml_collections.ConfigDict(dict(method="", overlap="average"))  # none (main.py's)
    studies = {}
    for n in SIZES:
        study = load_file(f"{Path(__file__).with_name('builtin.py')}:{task}")
        study.methods = ("esft_token", "esft_gate", "esft_lora_token", "lora", "fft")
        study.lr.esft_lora = 3e-3
        study.train = (*study.train, f"data.limit={n}")
        study.run_dir = f"{c.run_dir}/n{n}"
        study.launch = c.get_ref("launch")
        studies[f"n{n}"] = study
    c.studies = ml_collections.ConfigDict(studies)
    return c

"""The main table: the built-in study on every built-in downstream task, then one table of all.

    esft run --config configs/experiments/main.py
    esft run --config configs/experiments/main.py --config.launch=print    # one command per training
Each study keeps its own run directory (runs/esft_<task>, shared with `make run`).
"""

from pathlib import Path

import ml_collections

from esft_jax.app import config_blocks as blocks
from esft_jax.app.config_files import load_file
from esft_jax.builtin import suite as builtin_suite


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/main"
    blocks.launch(c)  # every study's variants train together, as this says
    # several domains, one model: each study's adapter of this method merged into one, scored on
    # every task ("" for none; overlap: refuse, average or first, checkpoint/merge.py)
    c.merge = ml_collections.ConfigDict(dict(method="esft_token", overlap="average"))
    c.studies = ml_collections.ConfigDict(
        {
            task: load_file(f"{Path(__file__).with_name('builtin.py')}:{task}")
            for task in builtin_suite.DOWNSTREAM
        }
    )
    for study in c.studies.values():  # `--config.launch=print` reaches every study
        study.launch = c.get_ref("launch")
    return c

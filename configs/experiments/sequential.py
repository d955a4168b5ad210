"""Several domains, one model, in turn: sequential ESFT with progressive freezing (DES-MoE) on the
built-in model's three downstream tasks (app/sequential.py).

    esft run --config configs/experiments/sequential.py

Each task trains its ESFT-Token experts (p=0.2) less those an earlier task trained, on the model the
earlier tasks left; after each, the merged model is scored on every task: the table shows how much
each task keeps (forgetting) and the general ability.
"""

from pathlib import Path

from esft_jax.app.config_blocks import selection
from esft_jax.app.config_files import load_file
from esft_jax.builtin import suite as builtin_suite


def get_config():
    c = load_file(str(Path(__file__).with_name("builtin.py")))
    c.sequence = tuple(builtin_suite.DOWNSTREAM)  # the tasks, in training order
    c.task = c.sequence[0]
    c.selection = selection("token", 0.2)  # each task's experts, before the frozen ones are dropped
    c.methods = ()  # a sequence trains ESFT at `selection` only
    c.run_dir = "runs/sequential"
    return c

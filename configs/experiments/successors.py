"""ESFT and the methods that followed it, on the built-in model and one task: the same profile,
data, steps and evaluation for each.

    esft run --config configs/experiments/successors.py          # :intent (default), :math, :sort

- ESFT-Token (p=0.2) and ESFT-Gate (p=0.1): the selected experts train (the paper).
- esft_lora at ESFT-Token's selection (MoE-Sieve): LoRA factors on the selected experts only.
- LoRA on every expert and the attention projections (configs/train.py:lora).
- router_densemixer: the router alone, its gradient from a dense pass over all experts (DenseMixer).
- FFT.
After training, each method's routing of the task is profiled again and compared with the base
model's (drift.md, drift.png: routing/drift.py).
"""

from pathlib import Path

import ml_collections

from esft_jax.app.config_files import load_file
from esft_jax.builtin import suite as builtin_suite

PRESETS = tuple(builtin_suite.DOWNSTREAM)  # the task


def get_config(task: str = "intent") -> ml_collections.ConfigDict:
    c = load_file(f"{Path(__file__).with_name('builtin.py')}:{task}")
    c.methods = ("esft_token", "esft_gate", "esft_lora_token", "lora", "router_densemixer", "fft")
    c.lr = ml_collections.ConfigDict(
        dict(fft=1e-3, lora=3e-3, esft=3e-3, esft_lora=3e-3, router_densemixer=3e-3)
    )
    c.drift.methods = c.methods
    c.run_dir = f"runs/successors_{task}"
    return c

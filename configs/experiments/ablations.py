"""The paper's ablations on the built-in model, each one `esft run` with more ESFT variants.

    esft run --config configs/experiments/ablations.py:p_sweep        # threshold p
    esft run --config configs/experiments/ablations.py:score          # token vs gate scores
    esft run --config configs/experiments/ablations.py:modules        # relevant experts +- shared/non-expert
    esft run --config configs/experiments/ablations.py:random         # random experts, the same counts
    esft run --config configs/experiments/ablations.py:granularity    # expert groups of 1 / 2 / 4
Append --config.launch=print to print one `esft train` command per variant instead of running them.
"""

from pathlib import Path

import ml_collections

from esft_jax.app.config_blocks import selection
from esft_jax.app.config_files import load_file

ABLATIONS = {
    "p_sweep": {
        f"token_p{round(p * 100):02d}": selection("token", p) for p in (0.05, 0.1, 0.2, 0.3, 0.5)
    },
    "score": {
        "token_p20": selection("token", 0.2),
        "gate_p20": selection("gate", 0.2),
        "token_p10": selection("token", 0.1),
        "gate_p10": selection("gate", 0.1),
    },
    "modules": {
        "relevant": selection(),
        "relevant_shared": selection(shared_experts=True),
        "relevant_nonexpert": selection(non_expert_modules=True),
        "shared_only": selection(shared_experts=True, shared_only=True),
    },
    "random": {"token": selection(), "random": selection(method="random")},
    "granularity": {f"group{g}": selection(method="group", group_size=g) for g in (1, 2, 4)},
}

PRESETS = tuple(ABLATIONS)


def get_config(arg: str = "p_sweep") -> ml_collections.ConfigDict:
    ablation, _, task = arg.partition(",")
    c = load_file(f"{Path(__file__).with_name('builtin.py')}:{task or 'intent'}")
    c.selections = ml_collections.ConfigDict(ABLATIONS[ablation])
    c.methods = ("fft", *(f"esft_{name}" for name in ABLATIONS[ablation]))
    c.run_dir = f"runs/ablation_{ablation}_{c.task}"
    return c

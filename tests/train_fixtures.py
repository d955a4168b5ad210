"""Shared setup for the training tests: a tiny base checkpoint, a task dataset, an expert config."""

import json
from pathlib import Path

import jax
import numpy as np

from esft_jax import configs
from esft_jax.checkpoint import save_checkpoint
from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.expert_config import ExpertConfig
from esft_jax.model import init_params

EXPERTS = ExpertConfig({1: [3, 17, 5], 2: [30], 3: [0, 9]})  # ragged across layers


def tiny_config(**changes):
    return configs.model_config(configs.load_file("configs/models/tiny.py")).replace(**changes)


def base_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny random model (router sharpened) with the byte tokenizer, as a HF checkpoint directory."""
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(seed))
    params["moe_layers"]["moe"]["router"] = params["moe_layers"]["moe"]["router"] * 15
    tokenizer_dir = path.with_name(path.name + "-tokenizer")
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    byte_tokenizer().save(str(tokenizer_dir / "tokenizer.json"))
    return save_checkpoint(path, cfg, params, tokenizer_from=tokenizer_dir)


def task_dataset(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A learnable task: the answer is the user's words reversed."""
    rng = np.random.default_rng(seed)
    words = "red green blue cat dog sun moon one two three".split()
    with path.open("w") as f:
        for _ in range(n):
            w = list(rng.choice(words, int(rng.integers(2, 5))))
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(w)},
                                             {"role": "assistant", "content": " ".join(reversed(w))}]}) + "\n")
    return path


def train_config(tmp: Path, method: str = "esft", **overrides):
    c = configs.load_file(f"configs/train.py:{method}")
    c.checkpoint = str(base_checkpoint(tmp / "base")) if not (tmp / "base").exists() else str(tmp / "base")
    c.data.train = str(task_dataset(tmp / "task.jsonl")) if not (tmp / "task.jsonl").exists() else str(tmp / "task.jsonl")
    c.expert_config = str(EXPERTS.save(tmp / "experts.json"))
    c.data.seq_len, c.batch_size, c.steps = 64, 4, 6
    c.data.validation_fraction = 0.1
    c.log_every, c.eval_every, c.checkpoint_every = 1, 3, 2
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-2, 0, 0.1
    c.workdir = str(tmp / f"run_{method}")
    for key, value in overrides.items():
        configs.apply_overrides(c, [f"{key}={value}"])
    return c

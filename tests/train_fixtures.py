"""Shared setup for the training tests: a tiny base checkpoint, an adapter of it, a task dataset,
an expert config, token batches and a few train steps of a method."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from esft_jax.app import config_files
from esft_jax.checkpoint import save_checkpoint
from esft_jax.checkpoint.adapter import write_adapter
from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.expert_config import ExpertConfig
from esft_jax.model import forward, init_params
from esft_jax.train.optimizer import Optim, learning_rate, make_optimizer
from esft_jax.train.step import make_train_step

EXPERTS = ExpertConfig({1: [3, 17, 5], 2: [30], 3: [0, 9]})  # ragged across layers


def esft_value_and_grad(method, cfg, frozen, rows, tokens):
    """(loss, its gradient in the trained rows) of a forward pass through `method`'s materialised
    params: a mean log-probability of token 0, so that every trained expert gets a gradient."""

    def loss(trainable):
        logits, _ = forward(method.materialize(frozen, trainable), tokens, cfg)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.value_and_grad(loss)(rows)


def tiny_config(**changes):
    return config_files.model_config(config_files.load_file("configs/models/tiny.py")).replace(
        **changes
    )


def tiny_params(seed: int = 0) -> dict:
    """Random params of the tiny model, router sharpened (so that routing discriminates)."""
    params = init_params(tiny_config(), jax.random.key(seed))
    params["moe_layers"]["moe"]["router"] = params["moe_layers"]["moe"]["router"] * 15
    return params


def base_checkpoint(path: Path, seed: int = 0) -> Path:
    """tiny_params with the byte tokenizer, as a HF checkpoint directory."""
    cfg, params = tiny_config(), tiny_params(seed)
    tokenizer_dir = path.with_name(path.name + "-tokenizer")
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    byte_tokenizer().save(str(tokenizer_dir / "tokenizer.json"))
    return save_checkpoint(path, cfg, params, tokenizer_from=tokenizer_dir)


def fake_esft_adapter(ckpt: Path, out: Path) -> Path:
    """An ESFT-style adapter: two routed experts of the checkpoint's second MoE layer, changed."""
    names = [
        f"model.layers.2.mlp.experts.{e}.{proj}.weight"
        for e in (3, 5)
        for proj in ("gate_proj", "down_proj")
    ]
    with safe_open(ckpt / "model.safetensors", "numpy") as f:
        tensors = {name: f.get_tensor(name) * 1.5 for name in names}
    return write_adapter(out, tensors, {"method": "esft", "model_type": "deepseek_v2"})


def task_dataset(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A learnable task: the answer is the user's words reversed."""
    rng = np.random.default_rng(seed)
    words = "red green blue cat dog sun moon one two three".split()
    with path.open("w") as f:
        for _ in range(n):
            w = list(rng.choice(words, int(rng.integers(2, 5))))
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": " ".join(w)},
                            {"role": "assistant", "content": " ".join(reversed(w))},
                        ]
                    }
                )
                + "\n"
            )
    return path


def train_config(tmp: Path, method: str = "esft", **overrides):
    c = config_files.load_file(f"configs/train.py:{method}")
    c.checkpoint = (
        str(base_checkpoint(tmp / "base")) if not (tmp / "base").exists() else str(tmp / "base")
    )
    c.data.train = (
        str(task_dataset(tmp / "task.jsonl"))
        if not (tmp / "task.jsonl").exists()
        else str(tmp / "task.jsonl")
    )
    c.expert_config = str(EXPERTS.save(tmp / "experts.json"))
    c.data.seq_len, c.batch_size, c.steps = 64, 4, 6
    c.data.validation_fraction = 0.1
    c.log_every, c.eval_every, c.checkpoint_every = 1, 3, 2
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-2, 0, 0.1
    c.workdir = str(tmp / f"run_{method}")
    for key, value in overrides.items():
        config_files.apply_overrides(c, [f"{key}={value}"])
    return c


def token_batch(seed: int = 0, accum: int = 1, b: int = 4, t: int = 32) -> dict:
    """Random byte tokens [accum, b, t]: row 1 packs two documents, row 2 ends in padding, ~70% of
    the tokens in the loss."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (accum, b, t)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[:, 1, 20:] = 2
    segments[:, 2, 25:] = 0
    positions = np.broadcast_to(np.arange(t), tokens.shape).copy()
    positions[:, 1, 20:] -= 20
    return {
        "tokens": tokens,
        "segment_ids": segments,
        "positions": positions,
        "loss_mask": (rng.random(tokens.shape) < 0.7).astype(np.int32),
    }


def optim(wd: float = 0.1, lr: float = 1e-3) -> Optim:
    # Adam turns float32 rounding in a near-zero gradient into an update of up to lr
    # (numerics.assert_adam_close).
    return Optim(
        lr=lr,
        schedule="constant",
        warmup_steps=0,
        end_lr_fraction=0.1,
        steps=10,
        adam_b1=0.9,
        adam_b2=0.95,
        adam_eps=1e-8,
        weight_decay=wd,
        grad_clip=1.0,
    )


def run_steps(method, cfg, params: dict, steps: int, seed: int = 0):
    """(state, last metrics) after `steps` train steps of `method` on token_batch(seed + i)."""
    tx = make_optimizer(optim())
    trainable = method.init(params)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "trainable": trainable,
        "opt_state": tx.init(trainable),
    }
    step = make_train_step(method, cfg, tx, learning_rate(optim()))
    for i in range(steps):
        state, metrics = step(state, params, jax.tree.map(jnp.asarray, token_batch(seed + i)))
    return state, metrics

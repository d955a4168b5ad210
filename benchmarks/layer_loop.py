"""A train step with a scan over the layers against a Python loop over them (`cfg.scan_layers`).

    .venv/bin/python benchmarks/layer_loop.py                  # the issue's model
    .venv/bin/python benchmarks/layer_loop.py --size large

FFT and ESFT (8 random experts per MoE layer), each compiled both ways in one process; the four
steps take turns rep by rep (timing.interleaved_seconds), so the machine's drift hits them alike.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from timing import carrying, compared, interleaved_seconds, train_state
from train_step import SIZES, _tokens, step_arguments, step_batch

from esft_jax.app import config_files
from esft_jax.app.commands import train as train_command
from esft_jax.expert_config import ExpertConfig
from esft_jax.model import ModelConfig, init_params
from esft_jax.report import markdown_table
from esft_jax.train.esft import ExpertSubset
from esft_jax.train.fft import FullFineTune
from esft_jax.train.optimizer import learning_rate, make_optimizer
from esft_jax.train.step import make_train_step


def main() -> None:
    args = step_arguments(__doc__.split("\n")[0]).parse_args()

    base = ModelConfig(model_type="deepseek_v2", **SIZES[args.size])
    params = init_params(base, jax.random.key(0))
    batch = step_batch(_tokens(base.vocab_size, args.batch, args.seq))
    rng = np.random.default_rng(0)
    experts = ExpertConfig(
        {
            layer: sorted(rng.choice(base.n_routed_experts, 8, replace=False).tolist())
            for layer in base.moe_layer_ids
        }
    )
    optim = train_command.optim(config_files.load_file("configs/train.py"))
    tx, schedule = make_optimizer(optim), learning_rate(optim)

    calls, compile_s = {}, {}
    for scan in (True, False):
        cfg = base.replace(scan_layers=scan)
        for name, method in (("FFT", FullFineTune()), ("ESFT", ExpertSubset.build(cfg, experts))):
            state = train_state(method, params, tx)
            start = time.perf_counter()
            step = make_train_step(method, cfg, tx, schedule).lower(state, params, batch).compile()
            compile_s[f"{name} {scan}"] = time.perf_counter() - start
            calls[f"{name} {scan}"] = carrying(step, state, params, batch)
    seconds = interleaved_seconds(calls, reps=args.reps)
    print(f"size {args.size}, batch {args.batch} x {args.seq}, float32, {args.reps} reps")
    print(
        markdown_table(
            ["method", "scan s/step", "loop s/step", "loop / scan", "compile s (scan / loop)"],
            [
                [
                    *compared(seconds, name, "True", "False"),
                    f"{compile_s[f'{name} True']:.1f} / {compile_s[f'{name} False']:.1f}",
                ]
                for name in ("FFT", "ESFT")
            ],
        )
    )


if __name__ == "__main__":
    main()

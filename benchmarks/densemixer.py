"""A train step with DenseMixer's router gradient (`router_grad="dense"`) against the plain one.

    .venv/bin/python benchmarks/densemixer.py                  # the tiny model (configs/models/tiny.py)
    .venv/bin/python benchmarks/densemixer.py --size issue     # benchmark 2's model

Router-only tuning and FFT, each compiled both ways in one process; the four steps take turns rep
by rep (timing.interleaved_seconds). The dense pass runs every expert on every token once more, in
the backward pass: E / k times the routed experts' forward FLOPs.
"""

from __future__ import annotations

import jax
from timing import carrying, compared, interleaved_seconds, machine, train_state
from train_step import SIZES, _tokens, step_arguments, step_batch

from esft_jax.app import config_files
from esft_jax.app.commands import train as train_command
from esft_jax.model import ModelConfig, init_params
from esft_jax.report import markdown_table
from esft_jax.train.fft import FullFineTune
from esft_jax.train.optimizer import learning_rate, make_optimizer
from esft_jax.train.router_only import RouterOnly
from esft_jax.train.step import make_train_step


def main() -> None:
    ap = step_arguments(__doc__.split("\n")[0])
    ap.set_defaults(size="tiny")  # the default (not one of --size's choices)
    args = ap.parse_args()
    if args.size == "tiny":
        base = config_files.model_config(config_files.load_file("configs/models/tiny.py"))
    else:
        base = ModelConfig(model_type="deepseek_v2", scan_layers=False, **SIZES[args.size])
    params = init_params(base, jax.random.key(0))
    batch = step_batch(_tokens(base.vocab_size, args.batch, args.seq))
    optim = train_command.optim(config_files.load_file("configs/train.py"))
    tx, schedule = make_optimizer(optim), learning_rate(optim)

    calls = {}
    for grad in ("sparse", "dense"):
        cfg = base.replace(router_grad=grad)
        for name, method in (("router", RouterOnly()), ("FFT", FullFineTune())):
            step = make_train_step(method, cfg, tx, schedule)
            calls[f"{name} {grad}"] = carrying(step, train_state(method, params, tx), params, batch)
    seconds = interleaved_seconds(calls, reps=args.reps)
    print(machine())
    print(
        f"size {args.size} (E={base.n_routed_experts}, k={base.num_experts_per_tok}), "
        f"batch {args.batch} x {args.seq}, {base.dtype}, {args.reps} reps"
    )
    print(
        markdown_table(
            ["method", "sparse s/step", "dense s/step", "dense / sparse"],
            [compared(seconds, name, "sparse", "dense") for name in ("router", "FFT")],
        )
    )


if __name__ == "__main__":
    main()

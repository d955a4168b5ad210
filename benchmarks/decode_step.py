"""Memory and time of one decoding step with the KV cache (model.forward_cached, T = 1 new token a row).

    .venv/bin/python benchmarks/decode_step.py                  # built-in model timed; V2-Lite, Qwen3 planned
    .venv/bin/python benchmarks/decode_step.py --batch 16 --max-len 4096

For each model the step is compiled with the cache donated (as eval/generate.py's loop and the
serving engine carry it) and its memory read from the compiled program, per device (XLA:CPU,
compiled without the CPU-only hoisting of bf16 weights, as `esft plan` does): the cache itself, the
temporaries, and what the step needs beyond its arguments (outputs not aliased to the donated cache
+ temporaries). Written in place, the cache needs no second copy of itself (the temporaries are
one layer's weights and attention intermediates). The built-in model's step is also run, its
median time printed. The large models are abstract (nothing allocated).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import machine

from esft_jax.app.config_blocks import model as model_block
from esft_jax.app.config_files import model_config
from esft_jax.model import forward_cached, init_cache
from esft_jax.model.params import abstract_params, init_params
from esft_jax.train.plan import CPU_ONLY, GIB

MODELS = ("tiny", "deepseek_v2_lite", "qwen3_30b_a3b")


def _step(cfg):
    def step(params, tokens_b1, cache):
        b = tokens_b1.shape[0]
        ones = jnp.ones((b, 1), jnp.int32)
        positions = cache.length[:, None]
        return forward_cached(
            params, tokens_b1, cfg, cache, segment_ids_bt=ones, positions_bt=positions
        )

    return jax.jit(step, donate_argnums=2)


def _bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure(name: str, batch: int, max_len: int, reps: int) -> list[str]:
    cfg = model_config(model_block(name))
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    params = abstract_params(cfg)
    step = _step(cfg)
    compiled = step.lower(params, tokens, cache).compile(compiler_options=CPU_ONLY)
    mem = compiled.memory_analysis()
    beyond = mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    ms = "-"
    if name == "tiny":
        real = init_params(cfg, jax.random.key(0))
        ids = jnp.asarray(
            np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, 1)), jnp.int32
        )
        live = init_cache(cfg, batch, max_len)
        times = []
        for _ in range(reps + 1):
            start = time.perf_counter()
            logits, live = compiled(real, ids, live)
            logits.block_until_ready()
            times.append(time.perf_counter() - start)
        ms = f"{1e3 * statistics.median(times[1:]):.2f}"
    cache_gib = _bytes(cache.kv) / GIB
    return [
        name,
        f"{batch} x {max_len}",
        f"{cache_gib:.3f}",
        f"{mem.temp_size_in_bytes / GIB:.3f}",
        f"{beyond / GIB:.3f}",
        ms,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    from esft_jax.report import markdown_table

    print(f"CPU: {machine()}; jax {jax.__version__}")
    rows = [measure(m, args.batch, args.max_len, args.reps) for m in args.models.split(",")]
    head = [
        "model",
        "rows x positions",
        "cache GiB",
        "temporaries GiB",
        "beyond arguments GiB",
        "step ms (run)",
    ]
    print(markdown_table(head, rows))


if __name__ == "__main__":
    main()

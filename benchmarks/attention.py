"""Attention on this machine: the reference path (float32 scores [B, H, T, S]) against
jax.nn.dot_product_attention (`attention_impl="dot_product"`) and blockwise attention
(`attention_impl="blockwise"`, blocks of --block), one layer's attention, forward + backward, the
three taking turns rep by rep in one process (timing.interleaved_seconds).

    .venv/bin/python benchmarks/attention.py                 # T = 1024
    .venv/bin/python benchmarks/attention.py --seq 2048 --dtype bfloat16

The cases are real models' attention shapes (fewer heads where noted, to fit a CPU): DeepSeek-V2-Lite's
MLA (q/k head 192, v head 128), Qwen3-30B-A3B's grouped-query heads, gpt-oss-20b's sinks and
sliding window. Also each path's compiled temporary bytes (XLA's buffer assignment).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from timing import interleaved_seconds, machine

from esft_jax.model import ModelConfig, init_params, segment_positions
from esft_jax.model.gqa import gqa
from esft_jax.model.mask import attention_mask
from esft_jax.model.mla import mla
from esft_jax.model.rope import rope_cos_sin
from esft_jax.report import markdown_table

CASES = {
    "MLA, V2-Lite (16 heads)": dict(
        attention="mla", hidden_size=2048, num_attention_heads=16, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    ),
    "GQA, Qwen3-30B-A3B (32 / 4 heads)": dict(
        attention="gqa", hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, qk_norm="head", rope_interleave=False,
    ),
    "GQA + sinks + window 128, gpt-oss-20b (32 / 4 of 64 / 8 heads)": dict(
        attention="gqa", hidden_size=2880, num_attention_heads=32, num_key_value_heads=4,
        head_dim=64, qkv_bias=True, o_bias=True, attention_sinks=True, sliding_window=128,
        sliding_window_layers=(0,), rope_interleave=False,
    ),
}  # fmt: skip


def _layer(cfg: ModelConfig, batch: int, seq: int):
    """(loss(p, x) of one attention layer over two packed documents a row, its params, x)."""
    params = init_params(cfg, jax.random.key(0))
    p = jax.tree.map(lambda a: a[0], params["dense_layers"]["attn"])
    x = jax.random.normal(jax.random.key(1), (batch, seq, cfg.hidden_size), cfg.dtype)
    segments = jnp.where(jnp.arange(seq) < seq // 3, 1, 2)[None].repeat(batch, 0)
    cos, sin = rope_cos_sin(segment_positions(segments), cfg)
    mask = attention_mask(segments, segments, 0, cfg.sliding_window or 0)
    attend = mla if cfg.attention == "mla" else gqa

    def loss(p, x):
        return jnp.sum(attend(p, x, cos, sin, mask, cfg)[0].astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), p, x


IMPLS = ("reference", "dot_product", "blockwise")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block", type=int, default=512, help="blockwise: queries and keys per block")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(machine())
    print(
        f"{jax.default_backend()}, batch {args.batch} x {args.seq}, {args.dtype}, "
        f"blocks of {args.block}, {args.reps} reps"
    )
    rows = []
    for name, fields in CASES.items():
        base = ModelConfig(
            num_hidden_layers=1, first_k_dense_replace=1, dtype=args.dtype, param_dtype=args.dtype,
            attention_block=args.block, **fields,
        )  # fmt: skip
        calls, temp = {}, {}
        for impl in IMPLS:
            step, p, x = _layer(base.replace(attention_impl=impl), args.batch, args.seq)
            temp[impl] = step.lower(p, x).compile().memory_analysis().temp_size_in_bytes
            calls[impl] = functools.partial(step, p, x)
        secs = interleaved_seconds(calls, reps=args.reps)
        ref = secs["reference"]
        rows.append(
            [name, *(f"{secs[impl] * 1e3:.1f}" for impl in IMPLS),
             *(f"{secs[impl] / ref:.2f}" for impl in IMPLS[1:]),
             " / ".join(f"{temp[impl] / 2**20:.0f}" for impl in IMPLS)]
        )  # fmt: skip
    head = [
        "attention", *(f"{impl} ms" for impl in IMPLS), "dot / ref", "blockwise / ref",
        "temp MiB (ref / dot / blockwise)",
    ]  # fmt: skip
    print(markdown_table(head, rows))


if __name__ == "__main__":
    main()

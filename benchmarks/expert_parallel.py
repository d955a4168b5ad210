"""Expert parallelism: the collectives one MoE layer's forward + backward compiles to, per exchange
("psum" vs "all_to_all", model/moe.py), read from the compiled HLO, on simulated devices.

    .venv/bin/python benchmarks/expert_parallel.py                       # data 2 x expert 4, 8 devices
    .venv/bin/python benchmarks/expert_parallel.py --mesh 1,8 --capacity 1.25

Bytes are per device and per layer (each collective's result size). Times on simulated CPU devices
share two cores, so they say little about a real interconnect; the bytes are what carries over.
"""

from __future__ import annotations

import os
import re
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from timing import seconds  # noqa: E402

from esft_jax import sharding  # noqa: E402
from esft_jax.model import ModelConfig, init_params, param_axes  # noqa: E402
from esft_jax.model.moe import moe_block  # noqa: E402
from esft_jax.report import markdown_table  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"(f64|f32|bf16|f16|s64|s32|u32|s8|u8|pred)\[([\d,]*)\]")
_BYTES = {
    "f64": 8,
    "s64": 8,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "bf16": 2,
    "f16": 2,
    "s8": 1,
    "u8": 1,
    "pred": 1,
}


def collective_bytes(hlo: str) -> dict[str, tuple[int, int]]:
    """{op: (count, result bytes)} over the collectives in an HLO module's text."""
    out: dict[str, tuple[int, int]] = {}
    for shapes, op in _OP.findall(hlo):
        size = 0
        for dtype, dims in _SHAPE.findall(shapes):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            size += n * _BYTES[dtype]
        count, total = out.get(op, (0, 0))
        out[op] = (count + 1, total + size)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mesh", default="2,4", help="data,expert")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument(
        "--capacity", type=float, default=0.0, help="all_to_all buffer factor (0: dropless)"
    )
    args = ap.parse_args()
    data, expert = map(int, args.mesh.split(","))
    mesh = sharding.make_mesh({"data": data, "expert": expert}, jax.devices()[: data * expert])
    rows = []
    for exchange in ("psum", "all_to_all"):
        cfg = ModelConfig(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            q_lora_rank=None,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            expert_parallel=exchange,
            capacity_factor=args.capacity or None,
        )
        layer = jax.tree.map(
            lambda a: a[0], init_params(cfg, jax.random.key(0))["moe_layers"]["moe"]
        )
        axes = jax.tree.map(
            lambda a: a[1:],
            param_axes(cfg)["moe_layers"]["moe"],
            is_leaf=lambda x: isinstance(x, tuple),
        )
        layer = sharding.shard_params(layer, axes, mesh)
        x = jax.device_put(
            jax.random.normal(jax.random.key(1), (args.batch, args.seq, cfg.hidden_size)),
            jax.NamedSharding(
                mesh, sharding.logical_to_spec(("act_batch", None, None), dict(mesh.shape))
            ),
        )

        def loss(p, x, cfg=cfg):
            out = moe_block(p, x, cfg)
            return jnp.sum(out.y_btd.astype(jnp.float32) ** 2), out.dropped

        with jax.set_mesh(mesh):
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
            hlo = step.lower(layer, x).compile().as_text()
            s = seconds(step, layer, x, reps=3)
            (_, dropped), _ = step(layer, x)
        found = collective_bytes(hlo)
        total = sum(b for _, b in found.values())
        detail = ", ".join(
            f"{op} x{n}: {b / 2**20:.2f} MiB" for op, (n, b) in sorted(found.items())
        )
        rows.append([exchange, detail, f"{total / 2**20:.2f}", f"{int(dropped)}", f"{s * 1e3:.0f}"])
    print(
        f"one MoE layer (hidden 256, 64 experts w128, top-6, 2 shared), batch {args.batch} x {args.seq}, "
        f"mesh data {data} x expert {expert}, capacity {args.capacity or 'dropless'}; per device"
    )
    print(
        markdown_table(
            [
                "exchange",
                "collectives (result bytes)",
                "total MiB",
                "dropped",
                "fwd+bwd ms (simulated)",
            ],
            rows,
        ),
        end="",
    )


if __name__ == "__main__":
    sys.exit(main())

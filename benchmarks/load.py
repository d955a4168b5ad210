"""Checkpoint loading: today's `load_checkpoint` + `shard_params` against `load_params_sharded`
(checkpoint/sharded_load.py), which builds each device's block straight from the files.

    .venv/bin/python benchmarks/load.py  # ~1 GiB float32 and bfloat16; 1 device, expert 8, fsdp 8
    .venv/bin/python benchmarks/load.py --gib 0.25 --dtypes bfloat16
    .venv/bin/python benchmarks/load.py --dtypes fp8      # FP8 experts kept FP8 (frozen_dtype=native)
    .venv/bin/python benchmarks/load.py --dtypes mxfp4    # gpt-oss-style MXFP4 experts kept MXFP4

Each row runs in a fresh process (its own device count, its own peak RSS). The checkpoint is a
synthetic DeepSeek-V2-style MoE, loaded on one device, an expert 8 mesh (expert weights once, the
rest on every device) and an fsdp 8 mesh (every weight once). "Peak RSS +" is the process's peak
resident memory after the load less before it. Simulated CPU devices keep their buffers in host
memory, so it includes "on devices" (the bytes of all device buffers: the file once, plus each
replica); "host extra" is the difference, what the loader itself held at its peak. The file is
read from the page cache after the first row (written just before), for both loaders alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MESHES = {"1 device": None, "expert 8": {"expert": 8}, "fsdp 8": {"fsdp": 8}}


def _config(dtype: str, gib: float):
    """The tiny config (gpt-oss-20b's for "mxfp4") widened (d 1024, 64 experts of width 512) with as
    many layers as make ~`gib` GiB."""
    from esft_jax.app import config_blocks, config_files
    from esft_jax.model.params import flat_param_specs

    preset = "gpt_oss_20b" if dtype == "mxfp4" else "tiny"
    base = config_files.model_config(config_blocks.model(preset))
    wide = dict(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2048,
        moe_intermediate_size=512,
        n_routed_experts=64,
        kv_lora_rank=128,
        num_attention_heads=8,
        num_key_value_heads=8,
        sliding_window_layers=(),
        param_dtype="bfloat16" if dtype == "mxfp4" else dtype,
        dtype="bfloat16" if dtype == "mxfp4" else dtype,
    )

    def size(n: int) -> int:
        specs = flat_param_specs(base.replace(**wide, num_hidden_layers=n))
        return sum(math.prod(s.shape) for s in specs.values())

    per_layer = size(3) - size(2)
    layers = max(
        2, round((gib * 2**30 / (4 if dtype == "float32" else 2) - size(2)) / per_layer) + 2
    )
    return base.replace(**wide, num_hidden_layers=layers)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f}"


def _write(path: Path, dtype: str, gib: float) -> Path:
    """A checkpoint of ~`gib` GiB; "fp8": the bf16 one with every routed expert matrix FP8 in
    128 x 128 blocks, as DeepSeek-V3 ships them (loaded with frozen_dtype=native)."""
    import jax

    from esft_jax.checkpoint import save_checkpoint
    from esft_jax.model import init_params

    if dtype == "fp8":
        return _fp8_copy(_write(path.with_name("bf16-source"), "bfloat16", gib), path)
    if dtype == "mxfp4":  # a bf16 gpt-oss-style checkpoint (its fused expert tensors), then packed
        cfg = _config(dtype, gib)
        src = save_checkpoint(
            path.with_name("bf16-source"), cfg, init_params(cfg, jax.random.key(0))
        )
        return _mxfp4_copy(src, path)
    cfg = _config(dtype, gib)
    return save_checkpoint(path, cfg, init_params(cfg, jax.random.key(0)))


def _fp8_copy(src: Path, dst: Path) -> Path:
    import numpy as np

    from esft_jax.checkpoint.native_export import quantize_matrix

    def convert(name, w):
        if ".experts." not in name:
            return {name: w}
        values, scale = quantize_matrix(w, (128, 128))
        return {name: values, name + "_scale_inv": scale.astype(np.float32)}

    return _quantized_copy(
        src, dst, {"quant_method": "fp8", "weight_block_size": [128, 128]}, convert
    )


def _mxfp4_copy(src: Path, dst: Path) -> Path:
    """`src` with its fused expert matrices in MXFP4 `_blocks` / `_scales`, as gpt-oss ships them."""
    import numpy as np

    from esft_jax.checkpoint import mxfp4

    def convert(name, w):
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {name: w}
        blocks, scales = mxfp4.quantize(w.astype(np.float32))
        return {name + "_blocks": blocks, name + "_scales": scales}

    return _quantized_copy(src, dst, {"quant_method": "mxfp4"}, convert)


def _quantized_copy(src: Path, dst: Path, quantization: dict, convert) -> Path:
    """`src` (removed after) as `dst`: each file tensor replaced by `convert(name, tensor)` (a dict
    of tensors), the index's map and config.json's quantization_config to match."""
    import shutil

    from esft_jax.checkpoint.hf import INDEX_FILE, read_safetensors
    from esft_jax.checkpoint.native_export import save_safetensors

    dst.mkdir(parents=True)
    weight_map = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors = {}
        with read_safetensors(file) as f:
            for name in f.keys():
                tensors.update(convert(name, f.get_tensor(name)))
        save_safetensors(tensors, dst / file.name, {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file.name))
    if (src / INDEX_FILE).is_file():
        (dst / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(config))
    shutil.rmtree(src)
    return dst


def _file_bytes(ckpt: Path) -> int:
    return sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))


def _child(ckpt: str, loader: str, mesh_name: str) -> dict:
    """Load once; seconds, peak RSS increase, device bytes and bytes read, as a dict."""
    import jax

    from esft_jax.app.runtime import peak_rss_bytes
    from esft_jax.checkpoint.hf import load_checkpoint, load_config
    from esft_jax.checkpoint.sharded_load import STATS, load_params_sharded
    from esft_jax.model.params import param_axes
    from esft_jax.sharding import make_mesh, shard_params

    frozen = (
        "native"
        if "quantization_config" in (Path(ckpt) / "config.json").read_text()
        else "bfloat16"
    )
    cfg = load_config(ckpt, frozen_dtype=frozen)
    mesh = make_mesh(MESHES[mesh_name]) if MESHES[mesh_name] else None
    jax.block_until_ready(jax.numpy.ones(8))  # backend started before the baseline
    rss0, start = peak_rss_bytes(), time.perf_counter()
    if loader == "new":
        params = load_params_sharded(ckpt, cfg, mesh)
        read = STATS["bytes_read"]
    else:
        _, params = load_checkpoint(ckpt, frozen_dtype=frozen)
        if mesh is not None:
            params = shard_params(params, param_axes(cfg), mesh)
        # every tensor, once (and the header)
        read = _file_bytes(Path(ckpt))
    jax.block_until_ready(params)
    seconds, rss = time.perf_counter() - start, peak_rss_bytes() - rss0
    on_devices = sum(
        s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards
    )
    return {"s": seconds, "rss": rss, "devices": on_devices, "read": read}


def _row(ckpt: Path, loader: str, mesh_name: str) -> dict:
    devices = math.prod((MESHES[mesh_name] or {}).values())
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(ckpt), loader, mesh_name],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="checkpoint size")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="of float32, bfloat16, fp8, mxfp4")
    ap.add_argument("--meshes", default=",".join(MESHES), help=f"some of {list(MESHES)}")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        ckpt, loader, devices = args.child
        print(json.dumps(_child(ckpt, loader, devices)))
        return
    from esft_jax.report import markdown_table

    cpu = " ".join(
        subprocess.run(
            "lscpu | grep 'Model name'", shell=True, capture_output=True, text=True
        ).stdout.split()
    )
    print(f"{cpu}; {os.cpu_count()} cores; simulated CPU devices")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            ckpt = _write(Path(tmp) / dtype, dtype, args.gib)
            size = _file_bytes(ckpt)
            for mesh_name in args.meshes.split(","):
                for loader, name in (
                    ("old", "load_checkpoint + shard_params"),
                    ("new", "load_params_sharded"),
                ):
                    r = _row(ckpt, loader, mesh_name)
                    rows.append(
                        [
                            dtype,
                            f"{size / 2**30:.2f}",
                            mesh_name,
                            name,
                            f"{r['s']:.2f}",
                            _gib(r["rss"]),
                            _gib(r["devices"]),
                            f"{(r['rss'] - r['devices']) / 2**30:.2f}",
                            _gib(r["read"]),
                        ]
                    )
    print(
        markdown_table(
            [
                "dtype",
                "file GiB",
                "mesh",
                "loader",
                "load s",
                "peak RSS + GiB",
                "on devices GiB",
                "host extra GiB",
                "GiB read",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()

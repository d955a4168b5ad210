"""load_params_sharded builds every leaf with its final sharding and equals load_checkpoint placed with
shard_params, bit for bit (float32, bfloat16, gpt-oss's fused and MXFP4 layouts, an adapter), while
an expert-parallel load reads each stored byte once."""

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import family_configs
import jax
import numpy as np
import pytest
import train_fixtures as fx
from safetensors.numpy import load_file, save_file

from esft_jax.checkpoint import CheckpointError, load_checkpoint, mxfp4, save_checkpoint
from esft_jax.checkpoint.adapter import load_with_adapter, write_adapter
from esft_jax.checkpoint.hf_names import tensor_maps
from esft_jax.checkpoint.sharded_load import STATS, _place, _sharding, load_params_sharded
from esft_jax.model import init_params
from esft_jax.model.params import flat_param_specs, param_axes
from esft_jax.sharding import make_mesh, shard_params

MESHES = [{"data": 2, "expert": 4}, {"fsdp": 8}, {"expert": 2, "tensor": 4}]


def _save(path: Path, cfg, seed: int = 0) -> Path:
    return save_checkpoint(path, cfg, init_params(cfg, jax.random.key(seed)))


def _stored_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the JSON header."""
    with path.open("rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


def _assert_same(got, want_host, mesh_shape, cfg) -> None:
    """Every leaf of `got` bitwise equal to the reference and sharded as shard_params places it."""
    want = (
        shard_params(want_host, param_axes(cfg), make_mesh(mesh_shape))
        if mesh_shape
        else jax.tree.map(jax.numpy.asarray, want_host)
    )
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        name = jax.tree_util.keystr(path)
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert g.sharding.is_equivalent_to(w.sharding, g.ndim), (name, g.sharding, w.sharding)
        np.testing.assert_array_equal(
            np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8), err_msg=name
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mesh_shape", [None, *MESHES], ids=str)
def test_equals_load_checkpoint_then_shard_params(tmp_path, dtype, mesh_shape):
    cfg = fx.tiny_config(param_dtype=dtype)
    ckpt = _save(tmp_path / "ckpt", cfg)
    _, want = load_checkpoint(ckpt)
    got = load_params_sharded(ckpt, cfg, make_mesh(mesh_shape) if mesh_shape else None)
    _assert_same(got, want, mesh_shape, cfg)


def _gpt_oss(tmp_path: Path, packed: bool) -> tuple:
    """gpt-oss's Hub layout (fused gate_up_proj / down_proj), optionally MXFP4-packed."""
    cfg = (
        family_configs.config("gpt_oss")
        if not packed
        else family_configs.config_from_hf(
            {**family_configs.HF["gpt_oss"], "hidden_size": 64, "intermediate_size": 32},
            param_dtype="bfloat16",
        )
    )
    ckpt = save_checkpoint(tmp_path / "fused", cfg, family_configs.params(cfg))
    if packed:
        tensors = load_file(ckpt / "model.safetensors")
        for base in [
            k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))
        ]:
            blocks, scales = map(
                np.ascontiguousarray, mxfp4.quantize(tensors.pop(base).astype(np.float32))
            )
            tensors[base + "_blocks"], tensors[base + "_scales"] = blocks, scales
        save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return cfg, ckpt


@pytest.mark.parametrize("packed", [False, True], ids=["fused", "mxfp4"])
def test_fused_and_mxfp4_layouts(tmp_path, packed):
    """Equal, and a fused tensor is read an expert at a time: once per part (gate_up twice), not once
    per device."""
    cfg, ckpt = _gpt_oss(tmp_path, packed)
    _, want = load_checkpoint(ckpt)
    mesh_shape = {"data": 2, "expert": 4}
    _assert_same(load_params_sharded(ckpt, cfg, make_mesh(mesh_shape)), want, mesh_shape, cfg)
    gate_up = sum(
        t.nbytes for k, t in load_file(ckpt / "model.safetensors").items() if ".gate_up_proj" in k
    )
    assert STATS["bytes_read"] == _stored_bytes(ckpt / "model.safetensors") + gate_up


def test_blocks_are_placed_as_they_are_read(monkeypatch):
    """Each block is placed on its replicas before the next is read, so the host holds one block at a
    time, not a leaf's every block (make_array_from_callback reads them all before placing any)."""
    events = []
    put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda x, device: events.append("put") or put(x, device))

    def read(index):
        events.append("read")
        return np.full(
            [len(range(*s.indices(n))) for s, n in zip(index, (8, 64, 32))],
            index[0].start,
            np.float32,
        )

    sharding = _sharding(("expert", None, None), make_mesh({"data": 2, "expert": 4}))
    array = _place((8, 64, 32), sharding, read)
    assert events == ["read", "put", "put"] * 4  # 4 distinct blocks, each on its 2 replicas
    assert array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array)[:, 0, 0], np.repeat([0, 2, 4, 6], 2))


@pytest.mark.parametrize("adopt", [True, False], ids=["host-buffer", "device-updates"])
@pytest.mark.parametrize("mesh_shape", [None, {"fsdp": 8}], ids=str)
def test_a_large_block_is_read_a_layer_at_a_time_into_its_device_buffer(
    tmp_path, monkeypatch, mesh_shape, adopt
):
    """A block over PIECEWISE_VALUES (lowered to 1 here) is read one row of its layer axis at a
    time, into a host array the CPU device adopts (no copy: the device buffer is that array) or,
    as on an accelerator, into the device buffer in place; the load equals load_checkpoint's, bit
    for bit."""
    from esft_jax.checkpoint import sharded_load

    cfg = fx.tiny_config(param_dtype="bfloat16")
    ckpt = _save(tmp_path / "ckpt", cfg)
    _, want = load_checkpoint(ckpt)
    monkeypatch.setattr(sharded_load, "PIECEWISE_VALUES", 1)
    monkeypatch.setattr(sharded_load, "_adopts_host_arrays", lambda device: adopt)
    reads, host_blocks, placed = [], [], []
    place_by_rows, aligned_empty = sharded_load._place_by_rows, sharded_load._aligned_empty
    monkeypatch.setattr(
        sharded_load,
        "_aligned_empty",
        lambda shape, dtype: host_blocks.append(aligned_empty(shape, dtype)) or host_blocks[-1],
    )
    monkeypatch.setattr(
        sharded_load,
        "_place_by_rows",
        lambda shape, index, read, device: (
            placed.append(place_by_rows(shape, index, lambda i: reads.append(i) or read(i), device))
            or placed[-1]
        ),
    )
    got = load_params_sharded(ckpt, cfg, make_mesh(mesh_shape) if mesh_shape else None)
    _assert_same(got, want, mesh_shape, cfg)
    assert reads and all(len(range(*i[0].indices(1 << 30))) == 1 for i in reads)
    assert len(host_blocks) == (len(placed) if adopt else 0)
    for host, device_block in zip(host_blocks, placed):
        assert device_block.unsafe_buffer_pointer() == host.ctypes.data


def test_expert_parallel_load_reads_every_stored_byte_once(tmp_path):
    cfg = fx.tiny_config(param_dtype="bfloat16")
    ckpt = _save(tmp_path / "ckpt", cfg)
    load_params_sharded(ckpt, cfg, make_mesh({"data": 2, "expert": 4}))
    assert STATS["bytes_read"] == _stored_bytes(ckpt / "model.safetensors")


def test_adapter_equals_load_with_adapter(tmp_path):
    cfg = fx.tiny_config()
    ckpt = _save(tmp_path / "ckpt", cfg)
    rng = np.random.default_rng(0)
    expert = "model.layers.2.mlp.experts.5.down_proj.weight"  # [d, f]
    lora = "model.layers.1.self_attn.kv_a_proj_with_mqa"  # [kv_lora + rope, d]
    tensors = {
        expert: rng.standard_normal((cfg.hidden_size, cfg.moe_intermediate_size), np.float32),
        f"{lora}.lora_A.weight": rng.standard_normal((2, cfg.hidden_size), np.float32),
        f"{lora}.lora_B.weight": rng.standard_normal(
            (cfg.kv_lora_rank + cfg.qk_rope_head_dim, 2), np.float32
        ),
    }
    adapter = write_adapter(tmp_path / "adapter", tensors, {"r": 2, "lora_alpha": 4})
    _, want = load_with_adapter(ckpt, adapter)
    mesh_shape = {"data": 2, "expert": 4}
    _assert_same(
        load_params_sharded(ckpt, cfg, make_mesh(mesh_shape), adapter), want, mesh_shape, cfg
    )


def test_errors_are_load_checkpoints(tmp_path):
    cfg = fx.tiny_config()
    ckpt = _save(tmp_path / "ckpt", cfg)
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.3.mlp.experts.7.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as want:
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError) as got:
        load_params_sharded(ckpt, cfg, make_mesh({"expert": 8}))
    assert str(got.value) == str(want.value)


_CHILD = """
import json, sys, jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import train_fixtures as fx
from esft_jax.checkpoint.sharded_load import STATS, load_params_sharded
from esft_jax.sharding import make_mesh
params = load_params_sharded(sys.argv[3], fx.tiny_config(param_dtype="bfloat16"), make_mesh({"expert": 2}))
print(json.dumps(STATS))
"""


@pytest.mark.slow  # two cooperating processes
def test_two_processes_each_read_their_half_of_the_experts(tmp_path):
    cfg = fx.tiny_config(param_dtype="bfloat16")
    ckpt = _save(tmp_path / "ckpt", cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1"),
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, f"127.0.0.1:{port}", str(i), str(ckpt)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    read = [json.loads(out.strip().splitlines()[-1])["bytes_read"] for out in outs]
    tensors, specs = load_file(ckpt / "model.safetensors"), flat_param_specs(cfg)
    # the routed experts and the router [embed, expert] are split over the expert axis
    expert_bytes = sum(
        tensors[m.hf_name].nbytes for m in tensor_maps(cfg) if "expert" in specs[m.path].axes
    )
    shared = _stored_bytes(ckpt / "model.safetensors") - expert_bytes
    assert read == [shared + expert_bytes // 2] * 2

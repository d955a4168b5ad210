"""FP8 (block-scaled) checkpoints: our dequantiser against transformers' (partial blocks, every byte,
a device's rows), both loaders against transformers' dequantised weights and its model's logits
(tiny DeepSeek-V3 and Qwen3-MoE in blocks of 16 x 32), the export of an FP8 base, and every
quantisation esft cannot read refused in one line."""

import json
import shutil
from pathlib import Path

import family_configs
import hf_models
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from esft_jax.checkpoint import CheckpointError, fp8, load_checkpoint, save_checkpoint
from esft_jax.checkpoint.hf_names import config_from_hf, tensor_maps
from esft_jax.checkpoint.sharded_load import load_params_sharded
from esft_jax.model import ConfigError, forward
from esft_jax.sharding import make_mesh
from esft_jax.tree import get_path

DTYPES = {  # ours, transformers', and the int of the same width (to compare bits)
    "bfloat16": (ml_dtypes.bfloat16, torch.bfloat16, np.int16),
    "float32": (np.float32, torch.float32, np.int32),
}
# (weight shape [..., out, in], block)
SHAPES = {
    "whole_blocks": ((48, 64), (16, 32)),
    "partial_blocks": ((50, 70), (16, 32)),
    "one_partial_block": ((5, 7), (16, 32)),
    "fused_experts": ((3, 40, 20), (16, 32)),
    "hub_block": ((130, 300), (128, 128)),
    "per_tensor": ((24, 40), None),
}


def _weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Normal values whose rows span many binades, so that blocks get different scales."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 3, (*shape[:-1], 1))
    return torch.from_numpy((rng.standard_normal(shape) * scale).astype(np.float32))


def _ours(w: torch.Tensor, scale: torch.Tensor, block, dtype, **kw) -> np.ndarray:
    w_np = w.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return fp8.dequantize(w_np, scale.numpy(), block, dtype, **kw)


def _assert_same_bits(ours: np.ndarray, ref: torch.Tensor, dtype: str) -> None:
    """Bit for bit, NaNs (whose payloads carry nothing) only where the reference has them."""
    ours_t, ref_t, bits = DTYPES[dtype]
    assert ours.dtype == ours_t and ref.dtype == ref_t and ours.shape == tuple(ref.shape)
    ref_bits = ref.contiguous().view(torch.int16 if bits == np.int16 else torch.int32).numpy()
    nan = np.isnan(ours.astype(np.float32))
    np.testing.assert_array_equal(nan, torch.isnan(ref.float()).numpy())
    np.testing.assert_array_equal(ours.view(bits)[~nan], ref_bits[~nan])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SHAPES)
def test_dequantizes_like_transformers(name, dtype):
    shape, block = SHAPES[name]
    w, scale = hf_models.fp8_quantize(_weights(shape, seed=0), block)
    assert tuple(scale.shape) == fp8.scale_shape(shape, block)
    ref = hf_models.fp8_dequantize(w, scale, block, DTYPES[dtype][1])
    _assert_same_bits(_ours(w, scale, block, DTYPES[dtype][0]), ref, dtype)
    assert (ref.float() - _weights(shape, seed=0)).abs().max() > 0  # it did quantise


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_byte_dequantizes_like_transformers(dtype):
    """All 256 FP8 codes (NaN, zeros, subnormals) under scales over many binades, in whole blocks:
    transformers' own Fp8Dequantize, unpadded."""
    rng = np.random.default_rng(1)
    codes = rng.permutation(np.tile(np.arange(256, dtype=np.uint8), 24)).reshape(64, 96)
    scale = torch.from_numpy((10.0 ** rng.uniform(-8, 8, (4, 3))).astype(np.float32))
    w = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    ref = Fp8Dequantize(None)._dequantize_one(w, scale, DTYPES[dtype][1])
    _assert_same_bits(_ours(w, scale, (16, 32), DTYPES[dtype][0]), ref, dtype)


@pytest.mark.parametrize("block", [(16, 32), None])
def test_rows_and_chunks_dequantize_as_the_whole(block):
    """A device's rows (a sharded load reads them with their scales' block rows) and any chunking
    give the whole matrix's values."""
    w, scale = hf_models.fp8_quantize(_weights((70, 50), seed=2), block)
    whole = _ours(w, scale, block, ml_dtypes.bfloat16)
    for start, stop in [(0, 70), (5, 9), (8, 40), (16, 32), (63, 70), (33, 34)]:
        rows = slice(start, stop)
        part = _ours(
            w[rows], scale[fp8.scale_rows(rows, block)], block, ml_dtypes.bfloat16, first_row=start
        )
        np.testing.assert_array_equal(part.view(np.int16), whole[rows].view(np.int16))
    for chunk in (1, 50, 7 * 50):
        got = _ours(w, scale, block, ml_dtypes.bfloat16, chunk_values=chunk)
        np.testing.assert_array_equal(got.view(np.int16), whole.view(np.int16))


# ---- checkpoints: tiny DeepSeek-V3 and Qwen3-MoE, their matrices FP8 in blocks of 16 x 32 ----

_jit_forward = jax.jit(forward, static_argnums=2)


def _batch(seed: int = 0, batch: int = 2, seq: int = 24):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 256, (batch, seq))
    mask = np.ones_like(tokens)
    mask[1, 17:] = 0
    return tokens, mask


def _rel_err(logits_btv, ref_btv, mask_bt) -> float:
    keep = mask_bt.astype(bool)
    return float(
        np.abs(np.asarray(logits_btv)[keep] - ref_btv[keep]).max() / np.abs(ref_btv[keep]).max()
    )


@pytest.fixture(scope="module", params=["v3", "qwen3_moe"])
def fp8_model(request, hf_checkpoint, tmp_path_factory):
    """(FP8 checkpoint, transformers' bfloat16 dequantisation of its FP8 tensors by name,
    transformers' model run on those weights)."""
    src, _ = hf_checkpoint(request.param)
    root = tmp_path_factory.mktemp(f"fp8_{request.param}")
    dequantised = hf_models.fp8_checkpoint(src, root / "fp8")
    reference = hf_models.load(hf_models.with_weights(src, root / "dequantised", dequantised))
    return root / "fp8", dequantised, reference


def test_both_loaders_give_transformers_dequantised_weights(fp8_model):
    ckpt, dequantised, _ = fp8_model
    cfg, params = load_checkpoint(ckpt)
    loads = {"load_checkpoint": params}
    for mesh in ({"fsdp": 8}, {"expert": 2, "tensor": 4}):  # fsdp: rows split inside blocks
        loads[str(mesh)] = load_params_sharded(ckpt, cfg, make_mesh(mesh))
    for name, loaded in loads.items():
        host = jax.tree.map(np.asarray, loaded)
        checked = 0
        for m in tensor_maps(cfg):
            if m.hf_name in dequantised:
                got = m.to_hf(get_path(host, m.path)[m.index])
                _assert_same_bits(got, dequantised[m.hf_name], "bfloat16")
                checked += 1
        assert checked == len(dequantised), name
        jax.tree.map(
            lambda g, w: np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8)),
            host,
            jax.tree.map(np.asarray, params),
        )


def test_logits_and_export_match_transformers(fp8_model, tmp_path):
    """Logits equal transformers' on the dequantised weights; the export writes them unquantised
    (bfloat16, no quantization_config), transformers loads it with the same logits, and it reads
    back here bit for bit."""
    ckpt, dequantised, reference = fp8_model
    cfg, params = load_checkpoint(ckpt, moe_strategy="capacity")
    tokens, mask = _batch()
    logits, _ = _jit_forward(params, jnp.asarray(tokens), cfg, segment_ids_bt=jnp.asarray(mask))
    ref_logits, _ = hf_models.run(reference, tokens, mask)
    assert _rel_err(logits, ref_logits, mask) <= 1e-4

    out = save_checkpoint(tmp_path / "export", cfg, params)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    stored = load_file(out / "model.safetensors")
    assert not any(n.endswith(fp8.SCALE_SUFFIX) for n in stored)
    assert {stored[n].dtype for n in dequantised} == {torch.bfloat16}
    exported_logits, _ = hf_models.run(hf_models.load(out), tokens, mask)
    assert _rel_err(logits, exported_logits, mask) <= 1e-4
    cfg2, params2 = load_checkpoint(out, moe_strategy="capacity")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)

    wide = save_checkpoint(tmp_path / "export32", cfg, params, dtype="float32")
    assert json.loads((wide / "config.json").read_text())["dtype"] == "float32"
    stored = load_file(wide / "model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float32}
    cfg3, params3 = load_checkpoint(wide, moe_strategy="capacity")
    assert cfg3.param_dtype == "float32"
    jax.tree.map(  # bf16 -> f32 is exact
        lambda a, b: np.testing.assert_array_equal(np.float32(a), np.float32(b)), params3, params
    )


def test_per_tensor_scales_load(hf_checkpoint, tmp_path):
    """weight_block_size null: one scale per matrix, read by the same code."""
    src, _ = hf_checkpoint("qwen3_moe")
    dequantised = hf_models.fp8_checkpoint(src, tmp_path, block=None)
    cfg, params = load_checkpoint(tmp_path)
    for m in tensor_maps(cfg):
        if m.hf_name in dequantised:
            got = m.to_hf(np.asarray(get_path(params, m.path)[m.index]))
            _assert_same_bits(got, dequantised[m.hf_name], "bfloat16")


# ---- refusals: one CheckpointError line, never a quantised tensor read as if it were not ----


@pytest.fixture(scope="module")
def fp8_qwen3(hf_checkpoint, tmp_path_factory) -> Path:
    src, _ = hf_checkpoint("qwen3_moe")
    ckpt = tmp_path_factory.mktemp("fp8_qwen3") / "ckpt"
    hf_models.fp8_checkpoint(src, ckpt)
    return ckpt


def _edited(src: Path, dst: Path, quant=..., edit=None) -> Path:
    """A copy of checkpoint `src` with config.json's quantization_config set to `quant` (removed if
    None, kept if not given) and its tensors changed by `edit(tensors)`."""
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    if quant is None:
        del config["quantization_config"]
    elif quant is not ...:
        config["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(config))
    if edit is not None:
        tensors = load_file(src / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _refused(ckpt: Path, *names: str, sharded: bool = False) -> str:
    with pytest.raises(CheckpointError) as e:
        cfg, _ = load_checkpoint(ckpt)
    if sharded:  # the sharded loader refuses it in the same words
        with pytest.raises(CheckpointError) as e_sharded:
            load_params_sharded(
                ckpt,
                config_from_hf(json.loads((ckpt / "config.json").read_text())),
                make_mesh({"fsdp": 8}),
            )
        assert str(e_sharded.value) == str(e.value)
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in names), message
    return message


@pytest.mark.parametrize(
    "quant",
    [
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"quant_method": "awq", "bits": 4},
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        {"quant_method": "compressed-tensors", "format": "float-quantized"},
        {"quant_method": "fbgemm_fp8"},
        {"bits": 4},
        "fp8",
    ],
    ids=lambda q: str(q.get("quant_method") if isinstance(q, dict) else q),
)
def test_other_quantisations_are_refused(fp8_qwen3, tmp_path, quant):
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    message = _refused(_edited(fp8_qwen3, tmp_path / "q", quant), "config.json", repr(method))
    assert "dequantise the checkpoint to bf16" in message


def test_malformed_block_size_is_refused(fp8_qwen3, tmp_path):
    quant = {"quant_method": "fp8", "weight_block_size": [128]}
    _refused(_edited(fp8_qwen3, tmp_path / "q", quant), "config.json", "weight_block_size")


def test_gpt_oss_mxfp4_config_is_read():
    """gpt-oss's Hub config.json carries an mxfp4 quantization_config (its experts' `_blocks` /
    `_scales` are dequantised on load: test_hf_parity.py)."""
    hf = {**family_configs.HF["gpt_oss"], "quantization_config": hf_models.MXFP4_CONFIG}
    assert config_from_hf(hf) == config_from_hf(family_configs.HF["gpt_oss"])


NAME = "model.layers.1.self_attn.o_proj.weight"


def test_fp8_tensor_without_its_scale_is_refused(fp8_qwen3, tmp_path):
    ckpt = _edited(fp8_qwen3, tmp_path / "q", edit=lambda t: t.pop(NAME + "_scale_inv"))
    _refused(ckpt, str(ckpt / "model.safetensors"), NAME, "F8_E4M3", "without scales", sharded=True)


def test_scales_without_an_fp8_config_are_refused(fp8_qwen3, tmp_path):
    ckpt = _edited(fp8_qwen3, tmp_path / "q", quant=None)
    _refused(ckpt, "config.json", "_scale_inv", "'fp8'")


def test_integer_tensor_is_refused(fp8_qwen3, tmp_path):
    """An unquantised checkpoint with one tensor stored as int8 (a packed or quantised format)."""

    def edit(tensors):
        for scale in [n for n in tensors if n.endswith(fp8.SCALE_SUFFIX)]:
            del tensors[scale]
            weight = scale.removesuffix(fp8.SCALE_SUFFIX)
            tensors[weight] = tensors[weight].float()
        tensors[NAME] = tensors[NAME].to(torch.int8)

    ckpt = _edited(fp8_qwen3, tmp_path / "q", quant=None, edit=edit)
    _refused(ckpt, NAME, "I8", sharded=True)


def test_scale_of_an_unquantised_tensor_is_refused(fp8_qwen3, tmp_path):
    def edit(tensors):
        tensors[NAME] = tensors[NAME].to(torch.bfloat16)

    _refused(_edited(fp8_qwen3, tmp_path / "q", edit=edit), NAME, "BF16", "_scale_inv")


def test_scales_of_the_wrong_shape_are_refused(fp8_qwen3, tmp_path):
    def edit(tensors):
        tensors[NAME + "_scale_inv"] = tensors[NAME + "_scale_inv"].T.contiguous()

    _refused(_edited(fp8_qwen3, tmp_path / "q", edit=edit), NAME + "_scale_inv", "expected")


def test_block_size_config_errors(tmp_path):
    for bad in ([16], [16, 0], "128", [16.0, 32]):
        with pytest.raises(ConfigError, match="weight_block_size"):
            fp8.block_size({"quant_method": "fp8", "weight_block_size": bad})
    assert fp8.block_size({"quant_method": "fp8"}) == (128, 128)
    assert fp8.block_size({"quant_method": "fp8", "weight_block_size": None}) is None

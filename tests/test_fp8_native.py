"""`frozen_dtype=native`: a fine-grained FP8 checkpoint's routed experts load as stored (FP8 bytes and
block scales), by both loaders, and the model computes what the bf16 load computes."""

from pathlib import Path

import hf_models
import jax
import numpy as np
import pytest

from esft_jax.checkpoint import CheckpointError, fp8, fp8_native, load_checkpoint
from esft_jax.checkpoint.hf import read_safetensors
from esft_jax.checkpoint.hf_names import tensor_maps
from esft_jax.checkpoint.sharded_load import load_params_sharded
from esft_jax.model import forward, quant
from esft_jax.model.config import ConfigError
from esft_jax.sharding import make_mesh
from esft_jax.tree import get_path


@pytest.fixture(scope="module")
def fp8_v3(hf_checkpoint, tmp_path_factory):
    src, _ = hf_checkpoint("v3")
    ckpt = tmp_path_factory.mktemp("fp8_native") / "fp8"
    hf_models.fp8_checkpoint(src, ckpt)
    return ckpt


def _file_tensors(ckpt) -> dict[str, np.ndarray]:
    with read_safetensors(ckpt / "model.safetensors") as f:  # FP8 as ml_dtypes arrays
        return {n: f.get_tensor(n) for n in f.keys() if ".experts." in n}


def test_native_experts_are_the_stored_bytes_and_compute_as_the_bf16_load(fp8_v3):
    cfg, params = load_checkpoint(fp8_v3, frozen_dtype="native")
    assert cfg.expert_fp8_block == hf_models.FP8_BLOCK
    experts = jax.tree.map(np.asarray, params["moe_layers"]["moe"]["experts"])
    stored = _file_tensors(fp8_v3)
    checked = 0
    for m in tensor_maps(cfg):
        if fp8_native.is_expert_matrix(m.path):
            values = experts[m.path[-1]][m.index]
            scale = experts[m.path[-1] + quant.SCALE][m.index]
            np.testing.assert_array_equal(values.T.view(np.uint8), stored[m.hf_name].view(np.uint8))
            np.testing.assert_array_equal(scale.T, stored[m.hf_name + "_scale_inv"])
            checked += 1
    assert checked == 3 * cfg.num_moe_layers * cfg.n_routed_experts

    bf16_cfg, bf16_params = load_checkpoint(fp8_v3)
    assert bf16_cfg.expert_fp8_block == ()
    tokens = np.random.default_rng(0).integers(3, 256, (2, 16))
    ours, _ = forward(params, tokens, cfg)
    theirs, _ = forward(bf16_params, tokens, bf16_cfg)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_the_sharded_loader_places_the_same_bytes(fp8_v3):
    cfg, params = load_checkpoint(fp8_v3, frozen_dtype="native")
    for mesh in ({"fsdp": 8}, {"expert": 2, "tensor": 4}):
        sharded = load_params_sharded(fp8_v3, cfg, make_mesh(mesh))
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(
                np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)
            ),
            sharded,
            params,
        )
        gate = get_path(sharded, ("moe_layers", "moe", "experts", "gate"))
        assert gate.dtype == np.dtype(quant.FP8)


def test_native_refuses_what_it_cannot_keep(fp8_v3, tmp_path):
    cfg, _ = load_checkpoint(fp8_v3, frozen_dtype="native")
    with pytest.raises(CheckpointError, match="adapter applied at load"):
        load_params_sharded(fp8_v3, cfg, None, adapter=tmp_path)
    with pytest.raises(ConfigError, match="MXFP4 experts are not kept quantised yet"):
        fp8_native.expert_block({"quantization_config": {"quant_method": "mxfp4"}}, "native")
    with pytest.raises(ConfigError, match="not one per matrix"):
        fp8_native.expert_block(
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}, "native"
        )
    assert (
        fp8_native.expert_block({"quantization_config": {"quant_method": "fp8"}}, "bfloat16") == ()
    )


def test_an_adapter_trained_on_the_fp8_base_equals_one_on_the_bf16_base(fp8_v3):
    """The same trained rows give the same adapter tensors (bf16, byte for byte) over either load:
    the FP8 stack is neither written into the adapter nor re-quantised for it."""
    from esft_jax.expert_config import ExpertConfig
    from esft_jax.train.trainable import ExpertSubset

    native_cfg, native = load_checkpoint(fp8_v3, frozen_dtype="native")
    cfg, params = load_checkpoint(fp8_v3)
    selection = ExpertConfig({layer: [0, 3] for layer in cfg.moe_layer_ids})
    ours, theirs = ExpertSubset.build(native_cfg, selection), ExpertSubset.build(cfg, selection)
    rows = ours.init(native)
    jax.tree.map(np.testing.assert_array_equal, rows, theirs.init(params))
    trained = jax.tree.map(lambda r: r * 1.01 + 0.001, rows)
    got, _ = ours.adapter_tensors(native_cfg, native, trained)
    want, _ = theirs.adapter_tensors(cfg, params, trained)
    assert got.keys() == want.keys() and len(got) == 3 * 2 * cfg.num_moe_layers
    for name in want:
        np.testing.assert_array_equal(got[name].view(np.uint16), want[name].view(np.uint16))


def test_the_serving_bank_over_the_fp8_base_serves_what_it_serves_over_the_bf16_base(
    fp8_v3, tmp_path
):
    """Adapters' rows in bf16 beside the FP8 stack: the bank's rows and every row's logits (base
    and adapter) equal those over the bf16 load."""
    from esft_jax.expert_config import ExpertConfig
    from esft_jax.serve.bank import build_bank
    from esft_jax.train.method import save_adapter
    from esft_jax.train.trainable import ExpertSubset

    native_cfg, native = load_checkpoint(fp8_v3, frozen_dtype="native")
    cfg, params = load_checkpoint(fp8_v3)
    method = ExpertSubset.build(cfg, ExpertConfig({layer: [2] for layer in cfg.moe_layer_ids}))
    trained = jax.tree.map(lambda r: r * 1.5, method.init(params))
    adapter = save_adapter(tmp_path / "adapter", cfg, method, params, trained)
    sets = np.array([0, 1])
    tokens = np.random.default_rng(1).integers(3, 256, (2, 16))
    logits = []
    for c, p in ((native_cfg, native), (cfg, params)):
        bank = build_bank(c, p, {"a": adapter})
        logits.append(np.asarray(forward(bank.params_for(p, sets), tokens, c)[0]))
    np.testing.assert_array_equal(logits[0], logits[1])


@pytest.mark.slow
def test_esft_train_on_an_fp8_base_trains_as_on_its_bf16_load(tmp_path, capsys):
    """`esft train --config.model.frozen_dtype=native` on an FP8 checkpoint: the losses equal
    those of the bf16 load to float32 rounding and its adapter holds bf16 experts."""
    import json

    import ml_dtypes
    import train_fixtures as fx

    from esft_jax import cli
    from esft_jax.checkpoint.adapter import read_adapter

    base = fx.train_config(tmp_path).checkpoint  # builds the bf16 base and its tokenizer
    ckpt = tmp_path / "fp8"
    hf_models.fp8_checkpoint(Path(base), ckpt)
    losses = {}
    for frozen in ("native", "bfloat16"):
        c = fx.train_config(
            tmp_path,
            checkpoint=str(ckpt),
            tokenizer=str(tmp_path / "base-tokenizer"),
            steps=3,
            workdir=str(tmp_path / frozen),
            **{"model.frozen_dtype": frozen},
        )
        cli.cmd_train(c)
        capsys.readouterr()
        metrics = [json.loads(line) for line in (tmp_path / frozen / "metrics.jsonl").open()]
        losses[frozen] = [m["loss"] for m in metrics if "loss" in m]
        tensors, _ = read_adapter(tmp_path / frozen / "adapter")
        assert {t.dtype for t in tensors.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert len(losses["native"]) == 3
    np.testing.assert_allclose(losses["native"], losses["bfloat16"], rtol=1e-5)


@pytest.fixture(scope="module")
def fp8_v3_whole_blocks(hf_checkpoint, tmp_path_factory):
    """FP8 in 8 x 8 blocks, which divide every matrix: transformers' own FP8 loader mishandles
    partial blocks (tests/test_fp8.py pads them for its reference)."""
    src, _ = hf_checkpoint("v3")
    ckpt = tmp_path_factory.mktemp("fp8_whole") / "fp8"
    hf_models.fp8_checkpoint(src, ckpt, block=(8, 8))
    return ckpt


def _transformers_logits(ckpt, tokens) -> np.ndarray:
    """transformers' fine-grained FP8 loader (on a CPU it dequantises, and runs in bf16)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt,
        attn_implementation="eager",
        experts_implementation="eager",
        dtype=torch.float32,
        quantization_config=transformers.FineGrainedFP8Config(
            weight_block_size=(8, 8), dequantize=True
        ),
    ).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
def test_a_native_export_is_the_base_in_fp8_with_the_trained_experts_requantised(
    fp8_v3_whole_blocks, tmp_path
):
    """`esft export --config.dtype=native`: every base tensor but the trained experts' byte for byte;
    those FP8 again in the base's blocks, within FP8's rounding of the adapter's; transformers'
    fine-grained FP8 loader reads the export as it reads the base (its logits as close to ours)."""
    from esft_jax import cli, config_files
    from esft_jax.checkpoint.adapter import read_adapter
    from esft_jax.expert_config import ExpertConfig
    from esft_jax.train.method import save_adapter
    from esft_jax.train.trainable import ExpertSubset

    base_dir, out_dir = fp8_v3_whole_blocks, tmp_path / "out"
    cfg, params = load_checkpoint(base_dir)
    method = ExpertSubset.build(cfg, ExpertConfig({layer: [1] for layer in cfg.moe_layer_ids}))
    trained_rows = jax.tree.map(lambda r: r * 1.25, method.init(params))
    adapter = save_adapter(tmp_path / "adapter", cfg, method, params, trained_rows)
    c = config_files.load(
        "configs/export.py",
        [f"checkpoint={base_dir}", f"adapter={adapter}", f"out={out_dir}", "dtype=native"],
    )
    cli.cmd_export(c)
    base, out = _all_tensors(base_dir), _all_tensors(out_dir)
    assert base.keys() == out.keys()
    trained, _ = read_adapter(adapter)
    for name in base:
        if name.removesuffix("_scale_inv") not in trained:
            np.testing.assert_array_equal(base[name].view(np.uint8), out[name].view(np.uint8))
    for name, want in trained.items():
        assert out[name].dtype == base[name].dtype  # FP8 again
        got = fp8.dequantize(out[name], out[name + "_scale_inv"], (8, 8), np.float32)
        want = want.astype(np.float32)
        assert np.all(np.abs(got - want) <= 2.0**-4 * np.abs(want) + 1e-6)

    tokens = np.random.default_rng(2).integers(3, 256, (2, 16))
    errors = []
    for ckpt in (base_dir, out_dir):
        ours_cfg, ours = load_checkpoint(ckpt)
        logits = np.asarray(forward(ours, tokens, ours_cfg)[0])
        errors.append(_rel(logits, _transformers_logits(ckpt, tokens)))
    assert errors[1] <= 2 * errors[0] + 1e-3 and errors[1] < 2e-2, errors


def _all_tensors(ckpt) -> dict[str, np.ndarray]:
    with read_safetensors(ckpt / "model.safetensors") as f:
        return {n: f.get_tensor(n) for n in f.keys()}

"""`frozen_dtype=native`: a fine-grained FP8 checkpoint's routed experts load as stored (FP8 bytes and
block scales), by both loaders, and the model computes what the bf16 load computes."""

from pathlib import Path

import hf_models
import jax
import numpy as np
import pytest

from esft_jax.checkpoint import CheckpointError, fp8_native, load_checkpoint
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

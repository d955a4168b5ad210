"""`frozen_dtype=native`: a quantised checkpoint's routed experts load as stored (fine-grained FP8
values and block scales: DeepSeek-V3, Qwen3-MoE; MXFP4 blocks and exponents: gpt-oss), by both
loaders, and the model, ESFT's gradients, its adapters and the serving bank compute what they compute
over the bf16 load."""

from pathlib import Path

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_float32_close, model_roundings
from train_fixtures import esft_value_and_grad

from esft_jax.checkpoint import CheckpointError, fp8, load_checkpoint, mxfp4, native
from esft_jax.checkpoint.hf import read_safetensors
from esft_jax.checkpoint.hf_names import tensor_maps
from esft_jax.checkpoint.sharded_load import load_params_sharded
from esft_jax.expert_config import ExpertConfig
from esft_jax.model import forward, quant
from esft_jax.model.config import ConfigError
from esft_jax.sharding import make_mesh
from esft_jax.train.esft import ExpertSubset
from esft_jax.tree import get_path

BASES = {
    "v3-fp8": ("v3", "fp8"),
    "qwen3-fp8": ("qwen3_moe", "fp8"),
    "gpt_oss-mxfp4": ("gpt_oss", "mxfp4"),
}


@pytest.fixture(scope="module", params=list(BASES))
def native_base(request, hf_checkpoint, tmp_path_factory):
    """(format, checkpoint directory) of a tiny model quantised as the Hub ships it."""
    variant, fmt = BASES[request.param]
    src, _ = hf_checkpoint(variant)
    ckpt = tmp_path_factory.mktemp("native") / request.param
    if fmt == "fp8":
        hf_models.fp8_checkpoint(src, ckpt)
    else:
        hf_models.mxfp4_checkpoint(src, ckpt)
    return fmt, ckpt


def _file_tensors(ckpt) -> dict[str, np.ndarray]:
    with read_safetensors(ckpt / "model.safetensors") as f:  # FP8 as ml_dtypes arrays
        return {n: f.get_tensor(n) for n in f.keys()}


def _assert_stored_bytes(fmt: str, cfg, params: dict, stored: dict) -> int:
    """Our quantised matrices hold the file's bytes (in our layout); -> matrices compared."""
    checked = 0
    for m in tensor_maps(cfg):
        if not native.is_native(m.path, cfg):
            continue
        values = get_path(params, m.path)[m.index]
        scale = get_path(params, native.scale_path(m.path))[m.index]
        if fmt == "fp8":
            values = values.reshape(m.hf_shape[::-1])  # a linear's [in, out] view
            np.testing.assert_array_equal(values.T.view(np.uint8), stored[m.hf_name].view(np.uint8))
            np.testing.assert_array_equal(scale.T, stored[m.hf_name + "_scale_inv"])
        else:  # gpt-oss: gate and up rows interleaved in gate_up_proj
            layer, e = m.index
            prefix = f"model.layers.{cfg.moe_layer_ids[layer]}.mlp.experts."
            fused, rows = {
                "gate": ("gate_up_proj", slice(0, None, 2)),
                "up": ("gate_up_proj", slice(1, None, 2)),
                "down": ("down_proj", slice(None)),
            }[m.path[-1]]
            blocks, scales = mxfp4.to_file(values, scale)
            np.testing.assert_array_equal(blocks, stored[prefix + fused + "_blocks"][e][rows])
            np.testing.assert_array_equal(scales, stored[prefix + fused + "_scales"][e][rows])
        checked += 1
    return checked


def test_native_experts_are_the_stored_bytes_and_compute_as_the_bf16_load(native_base):
    fmt, ckpt = native_base
    cfg, params = load_checkpoint(ckpt, frozen_dtype="native")
    assert cfg.expert_scheme == (
        quant.Mxfp4() if fmt == "mxfp4" else quant.Fp8Blocks(quant.block_io(hf_models.FP8_BLOCK))
    )
    # FP8: the attention, dense and shared MLP matrices too (every one FP8 in these files)
    assert cfg.linear_fp8 == (fmt == "fp8")
    linears = (
        sum(native.is_native(m.path, cfg) for m in tensor_maps(cfg))
        - 3 * cfg.num_moe_layers * cfg.n_routed_experts
    )
    assert linears >= (4 * cfg.num_hidden_layers if fmt == "fp8" else 0)
    checked = _assert_stored_bytes(fmt, cfg, jax.tree.map(np.asarray, params), _file_tensors(ckpt))
    assert checked == 3 * cfg.num_moe_layers * cfg.n_routed_experts + linears

    bf16_cfg, bf16_params = load_checkpoint(ckpt)
    assert bf16_cfg.expert_scheme is None
    tokens = np.random.default_rng(0).integers(3, 256, (2, 16))
    for strategy in ("blocked", "dense"):
        ours, _ = forward(params, tokens, cfg.replace(moe_strategy=strategy))
        theirs, _ = forward(bf16_params, tokens, bf16_cfg.replace(moe_strategy=strategy))
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_the_sharded_loader_places_the_same_bytes(native_base):
    _, ckpt = native_base
    cfg, params = load_checkpoint(ckpt, frozen_dtype="native")
    for mesh in ({"fsdp": 8}, {"expert": 2, "tensor": 4}):
        sharded = load_params_sharded(ckpt, cfg, make_mesh(mesh))
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(
                np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)
            ),
            sharded,
            params,
        )
        gate = get_path(sharded, ("moe_layers", "moe", "experts", "gate"))
        assert gate.dtype == np.dtype(cfg.expert_scheme.values_dtype)


def test_native_refuses_what_it_cannot_keep(native_base, tmp_path):
    _, ckpt = native_base
    cfg, _ = load_checkpoint(ckpt, frozen_dtype="native")
    with pytest.raises(CheckpointError, match="adapter applied at load"):
        load_params_sharded(ckpt, cfg, None, adapter=tmp_path)
    if cfg.linear_fp8:
        with pytest.raises(ConfigError, match="needs them unquantised, not FP8"):
            ExpertSubset.build(cfg, ExpertConfig({}, shared_experts=True))
    with pytest.raises(ConfigError, match="not one per matrix"):
        native.expert_fields(
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}, "native"
        )
    assert native.expert_fields({"quantization_config": {"quant_method": "fp8"}}, "bfloat16") == {}


def test_esft_on_the_native_base_trains_as_on_the_bf16_load(native_base):
    """ESFT's trained rows start as the bf16 load's experts; the loss equals that over the bf16
    load and its gradient to float32 rounding; the frozen quantised stack is never changed; the
    adapter's tensors (bf16) are byte for byte those over the bf16 load: the quantised stack is
    neither written into the adapter nor re-quantised for it."""
    _, ckpt = native_base
    native_cfg, native_params = load_checkpoint(ckpt, frozen_dtype="native")
    cfg, params = load_checkpoint(ckpt)
    selection = ExpertConfig({layer: [0, 3] for layer in cfg.moe_layer_ids})
    ours, theirs = ExpertSubset.build(native_cfg, selection), ExpertSubset.build(cfg, selection)
    rows = ours.init(native_params)
    jax.tree.map(np.testing.assert_array_equal, rows, theirs.init(params))
    tokens = np.random.default_rng(4).integers(3, 256, (2, 12))
    before = jax.tree.map(np.array, native_params)
    value, grads = esft_value_and_grad(ours, native_cfg, native_params, rows, tokens)
    value_bf16, grads_bf16 = esft_value_and_grad(theirs, cfg, params, rows, tokens)
    assert float(value) == float(value_bf16)
    jax.tree.map(lambda a, b: assert_float32_close(a, b, model_roundings(cfg)), grads, grads_bf16)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8)),
        before,
        jax.tree.map(np.array, native_params),
    )

    trained = jax.tree.map(lambda r: r * 1.01 + 0.001, rows)
    got, _ = ours.adapter_tensors(native_cfg, native_params, trained)
    want, _ = theirs.adapter_tensors(cfg, params, trained)
    assert got.keys() == want.keys() and len(got) >= 3 * 2 * cfg.num_moe_layers
    for name in want:
        np.testing.assert_array_equal(got[name].view(np.uint16), want[name].view(np.uint16))


def test_the_serving_bank_over_the_native_base_serves_what_it_serves_over_the_bf16_base(
    native_base, tmp_path
):
    """Adapters' rows in bf16 beside the quantised stack: every row's logits (base and adapter)
    equal those over the bf16 load."""
    from esft_jax.serve.bank import build_bank
    from esft_jax.train.method import save_adapter

    _, ckpt = native_base
    native_cfg, native_params = load_checkpoint(ckpt, frozen_dtype="native")
    cfg, params = load_checkpoint(ckpt)
    method = ExpertSubset.build(cfg, ExpertConfig({layer: [2] for layer in cfg.moe_layer_ids}))
    trained = jax.tree.map(lambda r: r * 1.5, method.init(params))
    adapter = save_adapter(tmp_path / "adapter", cfg, method, params, trained)
    sets = np.array([0, 1])
    tokens = np.random.default_rng(1).integers(3, 256, (2, 16))
    logits = []
    for c, p in ((native_cfg, native_params), (cfg, params)):
        bank = build_bank(c, p, {"a": adapter})
        served = bank.with_overrides(p)
        logits.append(np.asarray(forward(served, tokens, c, override_set_b=sets)[0]))
    np.testing.assert_array_equal(logits[0], logits[1])


@pytest.mark.slow
def test_esft_train_on_an_fp8_base_trains_as_on_its_bf16_load(tmp_path, capsys):
    """`esft train --config.model.frozen_dtype=native` on an FP8 checkpoint: the losses equal
    those of the bf16 load to float32 rounding and its adapter holds bf16 experts."""
    import json

    import ml_dtypes
    import train_fixtures as fx

    from esft_jax.app.commands import train as train_command
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
        train_command.run(c)
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


def _transformers_logits(ckpt, tokens, quantization_config) -> np.ndarray:
    """transformers' loader of a quantised checkpoint (on a CPU it dequantises)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt,
        attn_implementation="eager",
        experts_implementation="eager",
        dtype=torch.float32,
        quantization_config=quantization_config,
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
    import transformers

    from esft_jax.app import config_files
    from esft_jax.app.commands import export as export_command
    from esft_jax.checkpoint.adapter import read_adapter
    from esft_jax.train.method import save_adapter

    base_dir, out_dir = fp8_v3_whole_blocks, tmp_path / "out"
    cfg, params = load_checkpoint(base_dir)
    method = ExpertSubset.build(cfg, ExpertConfig({layer: [1] for layer in cfg.moe_layer_ids}))
    trained_rows = jax.tree.map(lambda r: r * 1.25, method.init(params))
    adapter = save_adapter(tmp_path / "adapter", cfg, method, params, trained_rows)
    c = config_files.load(
        "configs/export.py",
        [f"checkpoint={base_dir}", f"adapter={adapter}", f"out={out_dir}", "dtype=native"],
    )
    export_command.run(c)
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
        quantization = transformers.FineGrainedFP8Config(weight_block_size=(8, 8), dequantize=True)
        errors.append(_rel(logits, _transformers_logits(ckpt, tokens, quantization)))
    assert errors[1] <= 2 * errors[0] + 1e-3 and errors[1] < 2e-2, errors


def _all_tensors(ckpt) -> dict[str, np.ndarray]:
    with read_safetensors(ckpt / "model.safetensors") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


def test_a_native_mxfp4_export_rewrites_only_the_trained_experts_in_mxfp4(hf_checkpoint, tmp_path):
    """`esft export --config.dtype=native` on gpt-oss's MXFP4: every file tensor byte for byte but
    the trained experts' slices of the fused `_blocks` / `_scales` / biases; those slices MXFP4 again,
    within MXFP4's rounding of the adapter's; transformers' gpt-oss loader (dequantising on a CPU)
    reads the export with logits equal to ours to float32 rounding."""
    import transformers

    from esft_jax.checkpoint.native_export import export_native
    from esft_jax.train.method import save_adapter

    src, _ = hf_checkpoint("gpt_oss")
    base_dir, out_dir = tmp_path / "base", tmp_path / "out"
    hf_models.mxfp4_checkpoint(src, base_dir)
    cfg, params = load_checkpoint(base_dir, frozen_dtype="native")
    trained_experts = [1, 4]
    method = ExpertSubset.build(cfg, ExpertConfig({i: trained_experts for i in cfg.moe_layer_ids}))
    rows = jax.tree.map(lambda r: r * 1.25 + 0.01, method.init(params))
    adapter = save_adapter(tmp_path / "adapter", cfg, method, params, rows)
    export_native(base_dir, adapter, out_dir)

    base, out = _all_tensors(base_dir), _all_tensors(out_dir)
    assert base.keys() == out.keys()
    others = [e for e in range(cfg.n_routed_experts) if e not in trained_experts]
    for name in base:
        if ".experts." in name:
            np.testing.assert_array_equal(base[name][others], out[name][others])
            assert not np.array_equal(base[name][trained_experts], out[name][trained_experts])
        else:
            np.testing.assert_array_equal(base[name].view(np.uint8), out[name].view(np.uint8))
    got_cfg, got = load_checkpoint(out_dir)
    _, got_native = load_checkpoint(out_dir, frozen_dtype="native")
    for name in quant.QUANTIZED:  # the trained experts within half of FP4's widest step (2 x scale)
        back = np.asarray(got["moe_layers"]["moe"]["experts"][name][:, trained_experts], np.float32)
        exact = np.asarray(rows["experts"][name], np.float32)[:, : len(trained_experts)]
        exps = got_native["moe_layers"]["moe"]["experts"][name + quant.SCALE][:, trained_experts]
        scale = np.repeat(np.ldexp(1.0, exps.astype(np.int32) - 127), 32, axis=-2)
        assert np.all(np.abs(back - exact.astype(jnp.bfloat16).astype(np.float32)) <= scale)

    tokens = np.random.default_rng(5).integers(3, 256, (2, 16))
    ours = np.asarray(forward(got, tokens, got_cfg)[0])
    theirs = _transformers_logits(out_dir, tokens, transformers.Mxfp4Config(dequantize=True))
    assert _rel(ours, theirs) < 1e-5

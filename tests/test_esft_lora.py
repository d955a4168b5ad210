"""ESFT-LoRA: LoRA factors on the selected experts only. Only those experts' matrices change, each by
(alpha / r) A @ B (float64 NumPy); at init it is the base model, its gradient the base model's
through the chain rule; the adapter of factors merges on load (every family, the sharded loader, the
serving bank) to what training wrote back; quantised experts train as their bf16 load."""

import family_configs as fam
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx
from flax import traverse_util
from numerics import assert_float32_close, model_roundings
from test_fp8_experts import CFG as FP8_CFG
from test_fp8_experts import _dequantized, _quantized_params

from esft_jax.app import config_files, resume
from esft_jax.app.commands import plan as plan_command
from esft_jax.app.commands import train as loop
from esft_jax.app.commands.train import method_settings
from esft_jax.app.commands.train_checks import check_with_model
from esft_jax.app.config_files import ConfigFileError
from esft_jax.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from esft_jax.checkpoint.adapter import load_with_adapter, read_adapter
from esft_jax.checkpoint.native_export import export_native
from esft_jax.checkpoint.sharded_load import load_params_sharded
from esft_jax.expert_config import ExpertConfig, ExpertConfigError
from esft_jax.model import forward, quant
from esft_jax.serve.bank import build_bank
from esft_jax.sharding import make_mesh
from esft_jax.train.esft import ExpertSubset
from esft_jax.train.esft_lora import ExpertLoRA
from esft_jax.train.lora import LoRA
from esft_jax.train.method import build_method, save_adapter

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
EXPERTS = ("moe_layers", "moe", "experts")
MATRICES = ("gate", "up", "down")
PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # their HF names


def _method(cfg, ec: ExpertConfig = fx.EXPERTS) -> ExpertLoRA:
    return ExpertLoRA(ExpertSubset.build(cfg, ec), RANK, ALPHA)


def _selected(cfg, ec: ExpertConfig) -> np.ndarray:
    """[MoE layers, E]: True where the expert config selects the expert."""
    out = np.zeros((cfg.num_moe_layers, cfg.n_routed_experts), bool)
    for layer, ids in ec.experts.items():
        out[cfg.moe_layer_ids.index(layer), ids] = True
    return out


def _flat(params) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _random_b(method: ExpertLoRA, trainable: dict, seed: int = 0) -> dict:
    """The factors with B random in the used slots (as after training), zero in the unused."""
    rng, used = np.random.default_rng(seed), method.subset.slot_ids >= 0
    return {
        k: {
            "a": ab["a"],
            "b": (rng.normal(0, 0.05, ab["b"].shape) * used[..., None, None]).astype(np.float32),
        }
        for k, ab in trainable.items()
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(checkpoint directory, config, params) of the tiny model."""
    path = fx.base_checkpoint(tmp_path_factory.mktemp("esft_lora") / "base")
    cfg, params = load_checkpoint(path)
    return path, cfg, jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def trained(base):
    """(method, trained factors, the params before training as NumPy, last metrics): 3 steps."""
    _, cfg, frozen = base
    before = _flat(frozen)
    method = _method(cfg)
    state, metrics = fx.run_steps(method, cfg, frozen, 3)
    return method, state["trainable"], before, metrics


def test_the_preset_builds_it_from_an_expert_config_file(tmp_path):
    cfg = fx.tiny_config()
    c = config_files.load_file("configs/train.py:esft_lora")
    c.expert_config = str(fx.EXPERTS.save(tmp_path / "experts.json"))
    c.lora.rank, c.lora.alpha = 2, 6.0
    method = build_method(c.method, method_settings(c), cfg)
    assert isinstance(method, ExpertLoRA) and (method.rank, method.alpha) == (2, 6.0)
    assert method.expert_config == fx.EXPERTS  # what esft train records (expert_config.json)
    flagged = ExpertConfig(fx.EXPERTS.experts, shared_experts=True).save(tmp_path / "shared.json")
    c.expert_config = str(flagged)
    with pytest.raises(
        ExpertConfigError, match=r"shared\.json: shared_experts .* method=esft_lora"
    ):
        build_method(c.method, method_settings(c), cfg)
    c.expert_config = ""
    with pytest.raises(ConfigFileError, match=r"^--config\.expert_config: name the expert config"):
        check_with_model(c, cfg)


def test_a_resumed_run_refuses_other_experts(tmp_path):
    saved = fx.train_config(tmp_path, method="esft_lora")
    resume.save_run_files(saved.copy_and_resolve_references(), tmp_path, fx.EXPERTS)
    other = ExpertConfig(fx.EXPERTS.experts | {2: [31]})
    with pytest.raises(ConfigFileError, match=r"settings: expert_config layer 2 \[30\] -> \[31\];"):
        resume.resumed_config(saved, tmp_path, other)
    assert resume.resumed_config(saved, tmp_path, fx.EXPERTS).method == "esft_lora"


def test_only_the_selected_experts_matrices_change(base, trained):
    _, cfg, frozen = base
    method, trainable, before, metrics = trained
    assert np.isfinite(float(metrics["loss"]))
    frozen_now = _flat(frozen)  # the step never writes into the frozen params
    for path, value in before.items():
        np.testing.assert_array_equal(frozen_now[path].view(np.uint8), value.view(np.uint8))
    unused = method.subset.slot_ids < 0
    assert unused.any()  # the selection is ragged: some layers have unused slots
    for ab in trainable.values():  # no gradient, no weight decay of a zero: exactly zero
        assert not np.any(np.asarray(ab["a"])[unused]) and not np.any(np.asarray(ab["b"])[unused])

    after = _flat(method.write_back(frozen, trainable))
    selected = _selected(cfg, fx.EXPERTS)
    assert after.keys() == before.keys()
    for path, b in before.items():
        a = after[path]
        assert a.dtype == b.dtype, path
        if path[:3] == EXPERTS and path[3] in MATRICES:
            np.testing.assert_array_equal(a[~selected], b[~selected])  # bitwise
            assert all(not np.array_equal(a[li, e], b[li, e]) for li, e in zip(*selected.nonzero()))
        else:  # attention, router, shared experts, norms, embeddings, head
            np.testing.assert_array_equal(a, b, err_msg="/".join(path))


def test_a_selected_experts_update_is_alpha_over_r_times_a_b(base, trained):
    """write_back - base == (alpha / r) A @ B of that expert's trained factors, in float64."""
    _, cfg, frozen = base
    method, trainable, before, _ = trained
    after = _flat(method.write_back(frozen, trainable))
    rows = zip(method.subset.rows.tolist(), method.subset.row_slots.tolist())
    for (li, e), slot in rows:
        for k in MATRICES:
            a = np.asarray(trainable[k]["a"][li, slot], np.float64)
            b = np.asarray(trainable[k]["b"][li, slot], np.float64)
            want = before[(*EXPERTS, k)][li, e].astype(np.float64) + SCALE * a @ b
            assert_float32_close(after[(*EXPERTS, k)][li, e], want, 4, err_msg=f"{li} {e} {k}")


def test_written_back_params_compute_what_training_computed(base, trained):
    _, cfg, frozen = base
    method, trainable, _, _ = trained
    tokens = jnp.asarray(fx.token_batch(9)["tokens"][0])
    seen, _ = forward(method.materialize(frozen, trainable), tokens, cfg)
    exported, _ = forward(method.write_back(frozen, trainable), tokens, cfg)
    plain, _ = forward(frozen, tokens, cfg)
    assert_float32_close(exported, seen, model_roundings(cfg))
    assert np.abs(np.asarray(seen) - np.asarray(plain)).max() > 1e-4


def test_at_init_it_is_the_base_model_and_its_gradient_the_chain_rule(base):
    """B = 0: the loss is the base model's, A gets no gradient, and B's is (alpha / r) A^T dL/dW
    with dL/dW the base model's gradient in that expert's matrix (float64)."""
    _, cfg, frozen = base
    method = _method(cfg)
    trainable = method.init(frozen)
    tokens = jnp.asarray(fx.token_batch(2)["tokens"][0])
    value, grads = fx.esft_value_and_grad(method, cfg, frozen, trainable, tokens)

    def base_loss(params):
        logits, _ = forward(params, tokens, cfg)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    want_value, want_grads = jax.value_and_grad(base_loss)(frozen)
    assert_float32_close(value, want_value, model_roundings(cfg))
    unused = method.subset.slot_ids < 0
    for k in MATRICES:
        assert not np.any(np.asarray(grads[k]["a"]))
        assert not np.any(np.asarray(grads[k]["b"])[unused])
        a = np.asarray(trainable[k]["a"], np.float64)
        dw = np.asarray(want_grads["moe_layers"]["moe"]["experts"][k], np.float64)
        for (li, e), slot in zip(method.subset.rows.tolist(), method.subset.row_slots.tolist()):
            want = SCALE * a[li, slot].T @ dw[li, e]
            assert np.abs(want).max() > 0, (li, e)  # the batch reaches every selected expert
            got = grads[k]["b"][li, slot]
            assert_float32_close(got, want, model_roundings(cfg), err_msg=f"{li} {e} {k}")


def test_it_trains_r_in_plus_out_per_selected_matrix_fewer_than_lora_on_every_expert(base):
    _, cfg, frozen = base
    method = _method(cfg)
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    n = method.num_trained(method.init(frozen))
    assert n == fx.EXPERTS.num_selected() * 3 * RANK * (d + f)  # gate, up [d, f]; down [f, d]
    lora = LoRA(rank=RANK, alpha=ALPHA, targets=("experts",))
    every = lora.num_trained(lora.init(frozen))
    assert every == cfg.num_moe_layers * cfg.n_routed_experts * 3 * RANK * (d + f)
    assert n < every


def test_the_adapter_holds_the_selected_factors_and_merges_on_load(base, trained, tmp_path):
    path, cfg, frozen = base
    method, trainable, _, _ = trained
    adapter = save_adapter(tmp_path / "adapter", cfg, method, frozen, trainable)
    tensors, meta = read_adapter(adapter)
    assert set(tensors) == {
        f"model.layers.{layer}.mlp.experts.{e}.{PROJ[k]}.lora_{ab}.weight"
        for layer, ids in fx.EXPERTS.experts.items()
        for e in ids
        for k in MATRICES
        for ab in "AB"
    }
    assert meta == {
        "method": "esft_lora",
        "r": RANK,
        "lora_alpha": ALPHA,
        "expert_config": fx.EXPERTS.to_json(),
        "model_type": cfg.model_type,
    }
    _, merged = load_with_adapter(path, adapter)
    _assert_merged_is_written_back(merged, method.write_back(frozen, trainable))
    mesh_shape = {"data": 2, "expert": 4}
    sharded = load_params_sharded(path, cfg, make_mesh(mesh_shape), adapter)
    jax.tree.map(
        lambda got, want: np.testing.assert_array_equal(np.asarray(got), want), sharded, merged
    )

    with pytest.raises(
        CheckpointError, match=r"adapter: holds LoRA factors .*--config\.dtype=auto$"
    ):
        export_native(path, adapter, tmp_path / "native")

    bank = build_bank(cfg, frozen, {"task": adapter})  # served beside the base, as ESFT's rows
    ids = np.asarray(bank.override["ids"])[:, 1]  # [L, S] of the adapter's set
    for li, e in zip(*_selected(cfg, fx.EXPERTS).nonzero()):
        slot = list(ids[li]).index(e)
        for k in MATRICES:
            got = np.asarray(bank.override[k])[li, 1, slot]
            np.testing.assert_array_equal(got, merged["moe_layers"]["moe"]["experts"][k][li, e])


def _assert_merged_is_written_back(merged: dict, written: dict) -> None:
    """The merged load equals write_back: the expert matrices to float32 rounding (the merge sums
    B @ A in NumPy), every other leaf bit for bit."""
    merged, written = _flat(merged), _flat(written)
    assert merged.keys() == written.keys()
    for path, want in written.items():
        if path[:3] == EXPERTS and path[3] in MATRICES:
            assert_float32_close(merged[path], want, 4, err_msg="/".join(path))
        else:
            np.testing.assert_array_equal(merged[path], want, err_msg="/".join(path))


# the other families name their experts as DeepSeek does (mlp.experts.{e}.gate_proj, ...)
@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_other_expert_layouts_merge_on_load(family, tmp_path):
    """Per-expert HF names whatever the files hold (gpt-oss: every expert of a layer fused in one
    tensor, with biases, which stay as they are; Mixtral: block_sparse_moe w1/w2/w3)."""
    ckpt = save_checkpoint(tmp_path / "ckpt", fam.config(family), fam.params(fam.config(family)))
    cfg, frozen = load_checkpoint(ckpt)
    layers = cfg.moe_layer_ids
    method = _method(cfg, ExpertConfig({x: [1, 3] if x == layers[0] else [2] for x in layers}))
    trainable = _random_b(method, method.init(frozen))
    adapter = save_adapter(tmp_path / "adapter", cfg, method, frozen, trainable)
    _, merged = load_with_adapter(ckpt, adapter)
    written = method.write_back(frozen, trainable)
    _assert_merged_is_written_back(merged, written)
    assert not np.array_equal(
        merged["moe_layers"]["moe"]["experts"]["down"],
        frozen["moe_layers"]["moe"]["experts"]["down"],
    )
    mesh_shape = {"fsdp": 2, "expert": 4}
    sharded = load_params_sharded(ckpt, cfg, make_mesh(mesh_shape), adapter)
    jax.tree.map(
        lambda got, want: np.testing.assert_array_equal(np.asarray(got), want), sharded, merged
    )


def test_on_fp8_experts_it_trains_as_on_the_dequantized_ones():
    """The factors see the dequantised rows: loss and gradient those over the dequantised base; the
    FP8 stack is never changed; write_back re-quantises only the selected experts."""
    params = _quantized_params()
    plain_cfg, plain = _dequantized(params)
    selection = ExpertConfig({layer: [1, 4] for layer in FP8_CFG.moe_layer_ids})
    ours, theirs = _method(FP8_CFG, selection), _method(plain_cfg, selection)
    trainable = _random_b(ours, ours.init(params))
    jax.tree.map(np.testing.assert_array_equal, trainable, _random_b(theirs, theirs.init(plain)))
    tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, FP8_CFG.vocab_size)
    before = _flat(params)
    value, grads = fx.esft_value_and_grad(ours, FP8_CFG, params, trainable, tokens)
    value_plain, grads_plain = fx.esft_value_and_grad(theirs, plain_cfg, plain, trainable, tokens)
    assert float(value) == float(value_plain)
    jax.tree.map(
        lambda a, b: assert_float32_close(a, b, model_roundings(FP8_CFG)), grads, grads_plain
    )
    for path, value in _flat(params).items():
        np.testing.assert_array_equal(value.view(np.uint8), before[path].view(np.uint8))

    # write_back: the selected experts as the dequantised base's write_back re-quantised, the
    # others byte for byte
    merged, want = (
        _flat(ours.write_back(params, trainable)),
        _flat(theirs.write_back(plain, trainable)),
    )
    selected = _selected(FP8_CFG, selection)[..., None, None]
    for name in quant.QUANTIZED:
        requantised = FP8_CFG.expert_scheme.quantize(want[(*EXPERTS, name)])
        for key, new in zip((name, name + quant.SCALE), requantised):
            expect = np.where(selected, np.asarray(new), before[(*EXPERTS, key)])
            np.testing.assert_array_equal(
                merged[(*EXPERTS, key)].view(np.uint8), expect.view(np.uint8)
            )


def test_esft_plan_plans_it_from_the_expert_fraction(capsys):
    """Without an expert config, the first round(expert_fraction * E) experts of every layer."""
    c = config_files.load(
        "configs/plan.py:tiny",
        ["devices=(1,)", "methods=esft_lora", "batch_size=2", "seq_len=16", "lora_rank=4"],
    )
    plan_command.check(c)
    plan_command.run(c)
    out = capsys.readouterr().out
    assert "| esft_lora | 1 |" in out and "esft_lora: fits on 1 device(s)" in out


@pytest.mark.slow
def test_esft_train_records_the_selection_and_its_adapter_loads(tmp_path):
    """The train loop with --config.method=esft_lora: the expert config and the routing profile
    recorded as for ESFT, the summary's count, an adapter that changes only the selected experts."""
    profile = {"layers": [1, 2, 3], "per_layer": [0.5, 0.5, 0.5], "total": 0.5, "tokens": 8}
    c = fx.train_config(tmp_path, method="esft_lora", steps=2)
    c.expert_config = str(
        ExpertConfig(fx.EXPERTS.experts, profile=profile).save(tmp_path / "e.json")
    )
    c.profile_tokens = 64
    summary = loop.train(c, progress=False)
    cfg = fx.tiny_config()
    assert summary["trainable_params"] == (
        fx.EXPERTS.num_selected() * 3 * c.lora.rank * (cfg.hidden_size + cfg.moe_intermediate_size)
    )
    workdir = tmp_path / "run_esft_lora"
    assert ExpertConfig.load(workdir / "expert_config.json").experts == fx.EXPERTS.experts
    _, meta = read_adapter(workdir / "adapter")
    assert meta["method"] == "esft_lora" and meta["routing_profile"]["layers"] == [1, 2, 3]
    assert meta["routing_profile"] != profile  # measured on the trained model
    _, merged = load_with_adapter(c.checkpoint, workdir / "adapter")
    _, plain = load_checkpoint(c.checkpoint)
    merged, plain = _flat(merged), _flat(plain)
    changed = [p for p in plain if not np.array_equal(merged[p], plain[p])]
    assert sorted(changed) == sorted((*EXPERTS, k) for k in MATRICES)
    selected = _selected(cfg, fx.EXPERTS)
    for k in MATRICES:
        np.testing.assert_array_equal(
            merged[(*EXPERTS, k)][~selected], plain[(*EXPERTS, k)][~selected]
        )

"""DenseMixer's router gradient (cfg.router_grad="dense", model/router_grad.py): the forward pass
bit for bit the sparse one; the router's gradient that of the dense mixture over every expert
(against a float64 NumPy finite-difference reference of the rule); the experts' gradients and
everything downstream of the last router unchanged; the train config's switch, preset and
refusals."""

import re

import family_configs as fam
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx
from flax import traverse_util
from numerics import assert_float32_close, model_roundings, roundings

from esft_jax import sharding
from esft_jax.app import config_files
from esft_jax.app.commands import train as loop
from esft_jax.app.commands.train_checks import check_with_model
from esft_jax.expert_config import ExpertConfig
from esft_jax.model import abstract_params, forward, param_axes
from esft_jax.model.loss import next_token_loss
from esft_jax.model.moe import moe_block
from esft_jax.train import step
from esft_jax.train.esft import ExpertSubset
from esft_jax.train.router_only import RouterOnly
from esft_jax.tree import get_path

CFG = fx.tiny_config()
DENSE = CFG.replace(router_grad="dense")
B, T = 2, 4


# --- the float64 NumPy reference of the rule -------------------------------------------------


def _np_act(a, c, cfg):
    if cfg.expert_act == "swiglu":
        return a / (1 + np.exp(-a)) * c
    a, c = np.minimum(a, cfg.swiglu_limit), np.clip(c, -cfg.swiglu_limit, cfg.swiglu_limit)
    return a / (1 + np.exp(-cfg.swiglu_alpha * a)) * (c + 1)


def _np_experts(x_nd, p, cfg):
    """[E, N, d]: every expert on every token."""

    def bias(name):  # [E, 1, width], where the experts have it
        return p[name][:, None] if name in p else 0.0

    a = np.einsum("nd,edf->enf", x_nd, p["gate"]) + bias("gate_bias")
    c = np.einsum("nd,edf->enf", x_nd, p["up"]) + bias("up_bias")
    return np.einsum("enf,efd->end", _np_act(a, c, cfg), p["down"]) + bias("down_bias")


def _np_scores(z_ne, cfg):
    if cfg.scoring_func == "sigmoid":
        return 1 / (1 + np.exp(-z_ne))
    e = np.exp(z_ne - z_ne.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_gate_weights(z_ne, z0_ne, chosen_ne, cfg):
    """DenseMixer's gate weight of every expert at logits z: score * factor, the factor of a chosen
    expert with z's top-k sum, of any other with z0's (held constant)."""
    s, s0 = _np_scores(z_ne, cfg), _np_scores(z0_ne, cfg)
    normalise = cfg.norm_topk_prob and cfg.num_experts_per_tok > 1
    scale = cfg.routed_scaling_factor if cfg.scale_normalised_weights or not normalise else 1.0
    if not normalise:
        return s * scale
    total = (s * chosen_ne).sum(-1, keepdims=True)
    total0 = (s0 * chosen_ne).sum(-1, keepdims=True)
    return np.where(chosen_ne, s * scale / total, s * scale / total0)


def _np_rule_gradient(x_nd, layer, ids_nk, g_nd, cfg):
    """The gradient in (x, router, router bias) of
        phi = <g, sum_chosen w0 * MLP_e(x)>  (gate weights constant: the experts' path)
            + sum_ne c0[n, e] * w(z)[n, e],  z = x @ router + bias  (c0 = <g, MLP_e(x0)> constant),
    the DenseMixer rule: d phi / dz and the experts' path's d phi / dx by central differences in
    float64 (phi is a sum over tokens: a column's step moves every token's term at once), then
    through the logits' linear map."""
    p = {k: np.asarray(v, np.float64) for k, v in layer["experts"].items()}
    router, bias = np.asarray(layer["router"], np.float64), np.zeros(cfg.n_routed_experts)
    if "router_bias" in layer:
        bias = np.asarray(layer["router_bias"], np.float64)
    chosen = np.zeros((len(x_nd), cfg.n_routed_experts), bool)
    chosen[np.arange(len(x_nd))[:, None], ids_nk] = True
    z0 = x_nd @ router + bias
    w0 = _np_gate_weights(z0, z0, chosen, cfg) * chosen
    c0 = np.einsum("nd,end->ne", g_nd, _np_experts(x_nd, p, cfg))

    def experts_path_n(x):
        return (g_nd * np.einsum("ne,end->nd", w0, _np_experts(x, p, cfg))).sum(-1)

    def router_path_n(z):
        return (c0 * _np_gate_weights(z, z0, chosen, cfg)).sum(-1)

    def central(phi_n, at):
        grad, h = np.zeros_like(at), 1e-6
        for j in range(at.shape[1]):
            step = np.zeros_like(at)
            step[:, j] = h
            grad[:, j] = (phi_n(at + step) - phi_n(at - step)) / (2 * h)
        return grad

    dz = central(router_path_n, z0)
    return central(experts_path_n, x_nd) + dz @ router.T, x_nd.T @ dz, dz.sum(0)


# --- one MoE layer ---------------------------------------------------------------------------


def _layer_case(case):
    """(cfg, one MoE layer's random params (no shared experts), x [B, T, d]) of a router family."""
    if case == "deepseek_v2_groups_override":  # normalise *or* scale, group-limited, ESFT overrides
        groups = dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)
        cfg = CFG.replace(**groups, norm_topk_prob=True, routed_scaling_factor=16.0)
    else:
        cfg = fam.config(case)
    rng = np.random.default_rng(0)
    shapes = abstract_params(cfg)["moe_layers"]["moe"]
    layer = {
        k: jax.tree.map(lambda s: (rng.normal(size=s.shape[1:]) * 0.3).astype(np.float32), v)
        for k, v in shapes.items()
        if k not in ("shared", "shared_gate")
    }
    if case == "deepseek_v2_groups_override":
        ids = np.asarray([3, -1, 7], np.int32)
        rows = {k: v[np.maximum(ids, 0)] + 0.1 for k, v in layer["experts"].items()}
        layer["override"] = {"ids": ids, **rows}
    x = rng.normal(size=(B, T, cfg.hidden_size)).astype(np.float32)
    return cfg, layer, jnp.asarray(x)


def _layer_grads(cfg, layer, x, g):
    """(loss <g, y>, its gradient in the layer's params and in x, the layer's routing)."""
    ids = layer.get("override", {}).get("ids")  # integers: not differentiated

    def loss(layer, x):
        if ids is not None:
            layer = {**layer, "override": {**layer["override"], "ids": ids}}
        out = moe_block(layer, x, cfg)
        return jnp.sum(out.y_btd * g), out.routing

    if ids is not None:
        layer = {**layer, "override": {k: v for k, v in layer["override"].items() if k != "ids"}}
    (value, routing), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(layer, x)
    return value, grads, routing


def _effective_experts(layer):
    """The stacked experts with the override rows in place of their experts'."""
    p = {k: np.asarray(v, np.float64).copy() for k, v in layer["experts"].items()}
    for slot, e in enumerate(np.asarray(layer.get("override", {}).get("ids", []))):
        if e >= 0:
            for k in p:
                p[k][e] = np.asarray(layer["override"][k][slot])
    return p


CASES = ["deepseek_v2_groups_override", "deepseek_v3", "qwen3_moe", "olmoe", "gpt_oss"]


@pytest.mark.parametrize("case", CASES)
def test_router_gradient_is_the_dense_mixtures(case):
    """softmax with and without top-k normalisation, sigmoid (noaux_tc) with scaling, a router
    bias with gpt-oss's clamped, biased experts, group-limited normalise-or-scale with overrides."""
    cfg, layer, x = _layer_case(case)
    g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape).astype(np.float32))
    value, grads, routing = _layer_grads(cfg.replace(router_grad="dense"), layer, x, g)
    sparse_value, sparse_grads, _ = _layer_grads(cfg, layer, x, g)
    assert float(value) == float(sparse_value)

    ids = np.asarray(routing.expert_ids).reshape(B * T, -1)
    x64 = np.asarray(x, np.float64).reshape(B * T, -1)
    ref_layer = {**layer, "experts": _effective_experts(layer)}
    g64 = np.asarray(g, np.float64).reshape(B * T, -1)
    dx, drouter, dbias = _np_rule_gradient(x64, ref_layer, ids, g64, cfg)
    n = roundings(4, cfg.hidden_size)
    assert_float32_close(grads[0]["router"], drouter, n, "router")
    assert_float32_close(grads[1].reshape(B * T, -1), dx, n, "x")
    if "router_bias" in layer:
        assert_float32_close(grads[0]["router_bias"], dbias, n, "router_bias")
    # the rule is not the sparse gradient: the reference tells the two apart
    assert (
        np.abs(np.asarray(sparse_grads[0]["router"]) - drouter).max()
        > 100 * np.abs(np.asarray(grads[0]["router"]) - drouter).max()
    )


@pytest.mark.parametrize("case", ["deepseek_v2_groups_override", "gpt_oss"])
def test_experts_gradients_are_the_sparse_paths(case):
    cfg, layer, x = _layer_case(case)
    g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape).astype(np.float32))
    _, dense, _ = _layer_grads(cfg.replace(router_grad="dense"), layer, x, g)
    _, sparse, _ = _layer_grads(cfg, layer, x, g)
    n = roundings(4, cfg.hidden_size)
    for key in ("experts", "override"):
        for name, want in sparse[0].get(key, {}).items():
            assert_float32_close(dense[0][key][name], want, n, f"{key}/{name}")


# --- the whole model -------------------------------------------------------------------------


def _model_loss(params, cfg, batch):
    segments, positions = batch["segment_ids"], batch["positions"]
    logits, _ = forward(
        params, batch["tokens"], cfg, segment_ids_bt=segments, positions_bt=positions
    )
    return next_token_loss(logits, batch)[0]


@pytest.fixture(scope="module")
def params():
    return fx.tiny_params()


def test_forward_is_bit_identical(params):
    batch = jax.tree.map(lambda a: jnp.asarray(a[0]), fx.token_batch(3))
    run = jax.jit(forward, static_argnums=2)
    (logits, routing), (dense_logits, dense_routing) = (
        run(params, batch["tokens"], cfg) for cfg in (CFG, DENSE)
    )
    np.testing.assert_array_equal(dense_logits, logits)
    jax.tree.map(np.testing.assert_array_equal, dense_routing, routing)


@pytest.fixture(scope="module")
def fft_gradients(params):
    """(batch, FFT's gradient without and with the dense router gradient, flattened)."""
    batch = jax.tree.map(lambda a: jnp.asarray(a[0]), fx.token_batch(5))
    grad = jax.jit(jax.value_and_grad(_model_loss), static_argnums=1)
    (loss, sparse), (dense_loss, dense) = (grad(params, cfg, batch) for cfg in (CFG, DENSE))
    assert float(dense_loss) == float(loss)
    return batch, traverse_util.flatten_dict(sparse), traverse_util.flatten_dict(dense)


def test_only_gradients_upstream_of_a_router_change(fft_gradients):
    """FFT's gradient: every parameter upstream of a router changes (a router passes its gradient
    on to its input), every layer's router too; the last MoE layer's experts, the final norm and
    the head, downstream of the last router, are unchanged."""
    _, sparse, dense = fft_gradients
    for path in sparse:
        name = "/".join(path)
        if path in (("final_norm",), ("lm_head",)):
            assert_float32_close(dense[path], sparse[path], model_roundings(CFG), name)
            continue
        last = path[:3] in (("moe_layers", "moe", "experts"), ("moe_layers", "moe", "shared"))
        if last:
            assert_float32_close(dense[path][-1], sparse[path][-1], model_roundings(CFG), name)
        stacked = path[0] in ("dense_layers", "moe_layers")  # each layer's
        pairs = (
            zip(dense[path][: len(dense[path]) - last], sparse[path])
            if stacked
            else [(dense[path], sparse[path])]
        )
        for got, want in pairs:
            assert not np.allclose(got, want, rtol=1e-3, atol=0), name


def test_router_step_with_densemixer_changes_only_the_router(params):
    method = RouterOnly()
    state, metrics = fx.run_steps(method, DENSE, params, 2)
    assert np.isfinite(float(metrics["loss"]))
    before = traverse_util.flatten_dict(params)
    after = traverse_util.flatten_dict(method.write_back(params, state["trainable"]))
    router = ("moe_layers", "moe", "router")
    for path in before:
        if path != router:
            np.testing.assert_array_equal(after[path], before[path], err_msg="/".join(path))
    assert np.all(np.any(np.asarray(after[router] != before[router]), axis=(1, 2)))


def test_esft_with_non_expert_modules_takes_the_dense_router_gradient(params, fft_gradients):
    """ESFT's train step (the trained rows as overrides, the router a non-expert module), at its
    start the same model as FFT's: the same dense router gradient, the same gradient in the rows."""
    batch, _, want = fft_gradients
    method = ExpertSubset.build(DENSE, ExpertConfig(fx.EXPERTS.experts, non_expert_modules=True))
    loss = step._loss_fn(method, DENSE)
    got = jax.jit(jax.grad(lambda t: loss(t, params, batch)[0]))(method.init(params))
    n = 2 * model_roundings(CFG)  # the chunked loss against the plain one
    router = ("moe_layers", "moe", "router")
    assert_float32_close(get_path(got["non_expert"], router), want[router], n, "router")
    layer, expert = method.rows.T
    for name, rows in got["experts"].items():
        want_rows = want[("moe_layers", "moe", "experts", name)][layer, expert]
        assert_float32_close(rows[layer, method.row_slots], want_rows, n, name)


@pytest.mark.parametrize("exchange", ["psum", "all_to_all"])
def test_expert_parallel_router_gradient_equals_one_devices(params, exchange):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg = DENSE.replace(expert_parallel=exchange)
    batch = jax.tree.map(lambda a: jnp.asarray(a[0]), fx.token_batch(5, b=8, t=16))
    grad = jax.jit(jax.grad(_model_loss), static_argnums=1)
    want = grad(params, cfg, batch)["moe_layers"]["moe"]["router"]
    mesh = sharding.make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
    with jax.set_mesh(mesh):
        got = grad(sharding.shard_params(params, param_axes(cfg), mesh), cfg, batch)
    assert_float32_close(got["moe_layers"]["moe"]["router"], want, model_roundings(cfg))


# --- the train config: switch, preset, refusals ----------------------------------------------


def test_the_preset_trains_the_router_with_the_dense_gradient(tmp_path, monkeypatch):
    seen = []
    make = loop.make_train_step

    def recording(method, cfg, *args, **kwargs):
        seen.append(cfg.router_grad)
        return make(method, cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "make_train_step", recording)
    c = fx.train_config(tmp_path, method="router_densemixer", steps=1)
    assert c.method == "router" and c.densemixer is True
    summary = loop.train(c, progress=False)
    assert seen == ["dense"]
    assert summary["method"] == "router"


def _checked(tmp_path, method, **overrides):
    c = config_files.load_file(f"configs/train.py:{method}")
    c.expert_config = str(fx.EXPERTS.save(tmp_path / "experts.json"))
    c.data.train = str(fx.task_dataset(tmp_path / "task.jsonl"))
    for key, value in overrides.items():
        config_files.apply_overrides(c, [f"{key}={value}"])
    cfg = CFG.replace(router_grad=c.model.router_grad)
    check_with_model(c, cfg)


@pytest.mark.parametrize(
    "method, overrides, message",
    [
        ("lora", {"densemixer": True}, "--config.densemixer=True: method lora does not train"),
        (
            "esft",
            {"densemixer": True},
            "--config.densemixer=True: method esft does not train the "
            "router ({}: non_expert_modules false)",
        ),
        ("lora", {"model.router_grad": "dense"}, "--config.model.router_grad=dense: method lora"),
        ("router", {"densemixer": None}, "--config.densemixer=None: expected True or False"),
    ],
)
def test_a_method_that_does_not_train_the_router_is_refused(tmp_path, method, overrides, message):
    message = message.format(tmp_path / "experts.json")
    with pytest.raises(config_files.ConfigFileError, match="^" + re.escape(message)):
        _checked(tmp_path, method, **overrides)


def test_methods_that_train_the_router_are_accepted(tmp_path):
    for method in ("router", "fft", "router_densemixer"):
        _checked(tmp_path, method, densemixer=True)
    experts = ExpertConfig(fx.EXPERTS.experts, non_expert_modules=True)
    _checked(tmp_path, "esft", densemixer=True, expert_config=experts.save(tmp_path / "ne.json"))

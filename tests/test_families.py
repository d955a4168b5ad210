"""Every family through the shared model code: the MoE strategies agree (forward and gradients), a
data 2 x expert 4 mesh equals one device, the KV cache equals the full forward, and an ESFT run
changes exactly the selected experts' rows."""

import family_configs as fc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from numerics import assert_float32_close, model_roundings

from esft_jax import sharding
from esft_jax.expert_config import ExpertConfig
from esft_jax.model import forward, forward_cached, init_cache, param_axes
from esft_jax.model.loss import next_token_loss
from esft_jax.model.params import input_dims
from esft_jax.train.esft import ExpertSubset
from esft_jax.train.lora import LoRA
from esft_jax.train.trainable import ALWAYS_FROZEN, non_expert_part

_forward = jax.jit(forward, static_argnums=2)


def _loss(params, tokens, segments, cfg):
    logits, _ = forward(params, tokens, cfg, segment_ids_bt=segments)
    return next_token_loss(
        logits, {"tokens": tokens, "segment_ids": segments, "loss_mask": segments}
    )[0]


_grad = jax.jit(jax.grad(_loss), static_argnums=3)


@pytest.mark.parametrize("family", fc.NEW_FAMILIES)
def test_strategies_agree(family):
    dense = fc.config(family, moe_strategy="dense")
    params, (tokens, segments) = fc.params(dense), fc.batch(dense)
    ref_logits, ref_routing = _forward(params, tokens, dense, segment_ids_bt=segments)
    n = model_roundings(dense)
    for strategy in ("blocked", "ragged"):  # capacity: against transformers in test_hf_parity
        cfg = dense.replace(moe_strategy=strategy)
        logits, routing = _forward(params, tokens, cfg, segment_ids_bt=segments)
        assert_float32_close(logits, ref_logits, n, err_msg=strategy)
        np.testing.assert_array_equal(
            np.asarray(routing.expert_ids), np.asarray(ref_routing.expert_ids)
        )


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_blocked_gradients_equal_autodiff(family):
    """The blocked strategy's hand-written backward pass (expert biases, gpt-oss's clamped activation;
    Qwen's gated shared expert around it) against autodiff of the dense strategy."""
    dense = fc.config(family, moe_strategy="dense")
    params, (tokens, segments) = fc.params(dense), fc.batch(dense)
    n = model_roundings(dense)
    got = _grad(params, tokens, segments, dense.replace(moe_strategy="blocked"))
    want = _grad(params, tokens, segments, dense)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_float32_close(g, w, 4 * n)


@pytest.mark.parametrize("family", fc.NEW_FAMILIES)
def test_sharded_equals_single_device(family):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg = fc.config(family, moe_strategy="blocked")
    params, (tokens, segments) = fc.params(cfg), fc.batch(cfg, b=8)
    ref_logits, ref_routing = _forward(params, tokens, cfg, segment_ids_bt=segments)
    mesh = sharding.make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
    rows = NamedSharding(mesh, sharding.logical_to_spec(("act_batch", None), dict(mesh.shape)))
    sharded = sharding.shard_params(params, param_axes(cfg), mesh)
    for exchange in ("psum", "all_to_all") if family == "gpt_oss" else ("psum",):
        with jax.set_mesh(mesh):
            logits, routing = _forward(
                sharded,
                jax.device_put(tokens, rows),
                cfg.replace(expert_parallel=exchange),
                segment_ids_bt=jax.device_put(segments, rows),
            )
        assert_float32_close(logits, ref_logits, model_roundings(cfg), err_msg=exchange)
        np.testing.assert_array_equal(
            np.asarray(routing.expert_ids), np.asarray(ref_routing.expert_ids)
        )


@pytest.mark.parametrize(
    "family, attention_impl",
    [
        ("gpt_oss", "reference"),
        ("glm4_moe", "reference"),
        ("gpt_oss", "dot_product"),
        ("deepseek_v3", "dot_product"),
        ("gpt_oss", "blockwise"),
        ("deepseek_v3", "blockwise"),
    ],
)
def test_cache_equals_full_forward(family, attention_impl):
    """A prompt then tokens one at a time through the KV cache: the reference full forward's logits
    (sliding windows and sinks included; MLA's compressed cache), every attention path (blockwise
    in blocks of 3, which divide neither the prompt's 8 positions nor the cache's 16)."""
    ref_cfg = fc.config(family)
    params, (tokens, _) = fc.params(ref_cfg), fc.batch(ref_cfg, b=3, t=14)
    segments = jnp.ones_like(tokens)
    ref, _ = _forward(params, tokens, ref_cfg, segment_ids_bt=segments)
    cfg = ref_cfg.replace(attention_impl=attention_impl, attention_block=3)
    step = jax.jit(forward_cached, static_argnums=2)
    cache, got = init_cache(cfg, 3, 16), []
    for lo, hi in [(0, 8), *((i, i + 1) for i in range(8, 14))]:
        positions = jnp.broadcast_to(jnp.arange(lo, hi), (3, hi - lo))
        logits, cache = step(
            params,
            tokens[:, lo:hi],
            cfg,
            cache,
            segment_ids_bt=segments[:, lo:hi],
            positions_bt=positions,
        )
        got.append(logits)
    assert_float32_close(jnp.concatenate(got, axis=1), ref, model_roundings(cfg))


def _train(method, params, cfg, steps=2):
    import optax

    tx = optax.adam(1e-2)
    trainable = method.init(params)
    opt_state = tx.init(trainable)
    tokens, segments = fc.batch(cfg)

    @jax.jit
    def step(trainable, opt_state):
        grads = jax.grad(lambda t: _loss(method.materialize(params, t), tokens, segments, cfg))(
            trainable
        )
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    for _ in range(steps):
        trainable, opt_state = step(trainable, opt_state)
    return method.write_back(params, trainable)


@pytest.mark.parametrize("family", fc.NEW_FAMILIES)  # DeepSeek's: tests/test_trainable.py
def test_esft_changes_exactly_the_selected_rows(family):
    cfg = fc.config(family)
    params = fc.params(cfg)
    layers = cfg.moe_layer_ids
    chosen = {layers[0]: [1, 5], layers[-1]: [0, 2, 7]}
    method = ExpertSubset.build(cfg, ExpertConfig(chosen))
    after = _train(method, params, cfg)
    selected = np.zeros((cfg.num_moe_layers, cfg.n_routed_experts), bool)
    for layer, ids in chosen.items():
        selected[layers.index(layer), ids] = True
    before_experts, after_experts = (
        params["moe_layers"]["moe"]["experts"],
        after["moe_layers"]["moe"]["experts"],
    )
    assert set(before_experts) == set(after_experts)
    for k in before_experts:  # weights, and biases where the family has them
        a, b = np.asarray(before_experts[k]), np.asarray(after_experts[k])
        np.testing.assert_array_equal(a[~selected], b[~selected], err_msg=k)
        assert all(
            not np.array_equal(a[li, e], b[li, e]) for li, e in zip(*np.nonzero(selected))
        ), k
    rest = [
        (before, after_)
        for before, after_ in zip(
            jax.tree.leaves(non_expert_part(params)), jax.tree.leaves(non_expert_part(after))
        )
    ]
    # attention, router (+ biases), norms, embeddings
    assert all(np.array_equal(a, b) for a, b in rest)
    for name in ("shared", "shared_gate", *ALWAYS_FROZEN):
        if name in params["moe_layers"]["moe"]:
            for a, b in zip(
                jax.tree.leaves(params["moe_layers"]["moe"][name]),
                jax.tree.leaves(after["moe_layers"]["moe"][name]),
            ):
                np.testing.assert_array_equal(a, b)


def test_expert_config_keys_are_the_models_moe_layers():
    cfg = fc.config("qwen2_moe")  # decoder_sparse_step=2, layer 3 dense: MoE layers are 1 only
    assert cfg.moe_layer_ids == (1,) and cfg.dense_layer_ids == (0, 2, 3)
    with pytest.raises(Exception, match=r"layer 3 is not an MoE layer \(MoE layers are 1\)"):
        ExpertConfig.from_json({"experts": {"3": [0]}}, cfg.moe_layer_ids, cfg.n_routed_experts)


@pytest.mark.parametrize("family", fc.FAMILIES)  # MLA's projections too
def test_lora_covers_attention_and_expert_projections(family):
    """LoRA adapts every attention projection and every routed expert's weights (never a bias or norm)."""
    cfg = fc.config(family)
    params = fc.params(cfg)
    adapted = {path[1:] for path, _ in LoRA(targets=("attention", "experts")).target_paths(params)}
    attention = {
        ("attn", k)
        for k in params["moe_layers"]["attn"]
        if input_dims(("moe_layers", "attn", k)) is not None
    }
    assert attention >= (
        {("attn", w) for w in ("kv_a", "kv_b", "o")}
        if cfg.attention == "mla"
        else {("attn", w) for w in "qkvo"}
    )
    assert adapted == attention | {("moe", "experts", w) for w in ("gate", "up", "down")}

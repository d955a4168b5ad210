"""Serving adapters from one base model: a mixed batch gives every request what the merged model
(load_with_adapter: base + adapter written into one checkpoint) gives it alone."""

import jax
import numpy as np
import pytest
import train_fixtures as fx

from esft_jax import sharding
from esft_jax.checkpoint import load_checkpoint
from esft_jax.checkpoint.adapter import load_with_adapter, write_adapter
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.eval.generate import generate
from esft_jax.model import forward, param_axes
from esft_jax.serve.bank import build_bank
from esft_jax.serve.engine import Engine, Request

# (HF layer, expert, projections) each adapter changes; "partial" leaves up_proj as the base's
ADAPTERS = {
    "wide": [(1, e, ("gate_proj", "up_proj", "down_proj")) for e in range(0, 32, 2)],
    "two_layers": [(2, 3, ("gate_proj", "up_proj", "down_proj")), (3, 9, ("up_proj",))]
    + [(3, e, ("down_proj",)) for e in (0, 17)],
    "partial": [(2, e, ("gate_proj", "down_proj")) for e in (3, 5)],
}


def _adapter(base_tensors: dict, rows, out, seed: int):
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer, expert, projections in rows:
        for proj in projections:
            name = f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
            w = base_tensors[name]
            tensors[name] = (w + 2.0 * w.std() * rng.standard_normal(w.shape)).astype(w.dtype)
    return write_adapter(out, tensors, {"method": "esft", "model_type": "deepseek_v2"})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from safetensors.numpy import load_file

    root = tmp_path_factory.mktemp("serve")
    base = fx.base_checkpoint(root / "base")
    tensors = load_file(base / "model.safetensors")
    adapters = {
        name: _adapter(tensors, rows, root / name, seed)
        for seed, (name, rows) in enumerate(ADAPTERS.items())
    }
    cfg, params = load_checkpoint(base)
    return cfg, params, base, adapters


def _requests(n: int = 7):
    names = [None, *ADAPTERS]
    rng = np.random.default_rng(0)
    return [
        Request(
            rng.integers(1, 256, 3 + 2 * i).tolist(), names[i % len(names)], max_tokens=4 + i % 3
        )
        for i in range(n)
    ]


_forward = jax.jit(forward, static_argnums=2)
MAX_TOKENS = 6  # every request's max_tokens is at most this: one compilation serves them all


def _alone(cfg, params, base, adapters, request):
    """The request's tokens from the merged model of its adapter (the base for None), generated
    alone (eval/generate.py: its own batch and cache), with its sampling settings."""
    merged = (
        params if request.model is None else load_with_adapter(base, adapters[request.model])[1]
    )
    out = generate(
        merged,
        cfg,
        [request.prompt],
        max_new_tokens=MAX_TOKENS,
        eos_id=cfg.eos_token_id,
        sampling=[(request.temperature, request.top_p, request.seed)],
    )
    return out[0][: request.max_tokens]


def test_mixed_batch_equals_each_merged_model_alone(served):
    cfg, params, base, adapters = served
    requests = _requests()
    want = [_alone(cfg, params, base, adapters, r) for r in requests]
    prompts = [r.prompt for r in requests]
    as_base = generate(params, cfg, prompts, max_new_tokens=MAX_TOKENS, eos_id=cfg.eos_token_id)
    assert any(w != b[: len(w)] for w, b in zip(want, as_base)), (
        "the adapters must change some outputs"
    )
    assert Engine(cfg, params, adapters).generate(requests) == want


def test_bank_logits_equal_merged_logits(served):
    """Row by row, the bank's forward pass equals the merged model's (float32 rounding)."""
    cfg, params, base, adapters = served
    bank = build_bank(cfg, params, adapters)
    tokens = np.random.default_rng(1).integers(1, 256, (4, 24))
    sets = np.array([bank.index(n) for n in ("two_layers", None, "wide", "partial")])
    got, _ = _forward(bank.with_overrides(params), tokens, cfg, override_set_b=sets)
    for row, name in enumerate(("two_layers", None, "wide", "partial")):
        merged = params if name is None else load_with_adapter(base, adapters[name])[1]
        want, _ = _forward(merged, tokens[row : row + 1], cfg)
        np.testing.assert_allclose(got[row], want[0], rtol=0, atol=2e-5 * float(np.abs(want).max()))
    assert bank.experts[bank.index("two_layers") - 1] == {
        1: [3],
        2: [0, 9, 17],
    }  # MoE layer index -> experts


def test_an_adapter_of_other_tensors_is_refused(served, tmp_path):
    from safetensors.numpy import load_file

    cfg, params, base, adapters = served
    name = "model.layers.1.self_attn.o_proj.weight"
    attention = {name: load_file(base / "model.safetensors")[name] * 2}
    attn = write_adapter(tmp_path / "attn", attention, {"method": "fft"})
    with pytest.raises(CheckpointError, match=r"o_proj.weight is not a routed expert's tensor"):
        build_bank(cfg, params, {**adapters, "attn": attn})
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        Engine(cfg, params, adapters).generate([Request([1, 2], "nope")])


@pytest.mark.parametrize("exchange", ["psum", "all_to_all"])
def test_mixed_batch_on_the_mesh_equals_one_device(served, exchange):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg, params, base, adapters = served
    cfg = cfg.replace(expert_parallel=exchange)
    requests = _requests()
    want = [_alone(cfg, params, base, adapters, r) for r in requests]
    mesh = sharding.make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
    with jax.set_mesh(mesh):
        on_mesh = sharding.shard_params(params, param_axes(cfg), mesh)
        assert Engine(cfg, on_mesh, adapters, mesh=mesh).generate(requests) == want


def test_coverage_is_the_gate_mass_on_the_adapters_experts(served):
    """Against a float64 loop over each request's own forward pass through its merged model
    (alone, unpadded): past the first MoE layer the base router reads the adapter's outputs."""
    cfg, params, base, adapters = served
    engine = Engine(cfg, params, adapters)
    requests = _requests()
    outputs = engine.generate(requests)
    got = engine.coverage(requests, outputs)
    trained = {None: {}, **{name: {} for name in ADAPTERS}}
    for name, rows in ADAPTERS.items():
        for layer, expert, _ in rows:
            trained[name].setdefault(cfg.moe_layer_ids.index(layer), set()).add(expert)
    for r, out, cov in zip(requests, outputs, got):
        # right-padded to one width: causal, so the n tokens route alike
        n = len(r.prompt) + len(out)
        merged = params if r.model is None else load_with_adapter(base, adapters[r.model])[1]
        _, routing = _forward(merged, np.asarray([[*r.prompt, *out] + [0] * (32 - n)]), cfg)
        ids = np.asarray(routing.expert_ids)[:, 0, :n]
        w = np.asarray(routing.gate_weights, np.float64)[:, 0, :n]
        hit = [
            sum(w[li][ids[li] == e].sum() for e in trained[r.model].get(li, ()))
            for li in range(len(ids))
        ]
        mass = w.sum(axis=(1, 2))
        np.testing.assert_allclose(cov.per_layer, np.array(hit) / mass, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(cov.total, sum(hit) / mass.sum(), rtol=1e-6, atol=1e-9)
    # the base; "wide" trains half of layer 1
    assert got[0].total == 0.0 and got[1].per_layer[0] > 0.2


def test_requests_joining_a_running_decode_get_what_they_get_alone(served):
    """Two rows for nine requests (greedy and sampled): requests join as others leave, each
    at its own cache length, and every one gets exactly its tokens alone."""
    cfg, params, base, adapters = served
    sampled = [
        Request(r.prompt, r.model, MAX_TOKENS, temperature=0.9, top_p=0.95, seed=7 + i)
        for i, r in enumerate(_requests(2))
    ]
    requests = _requests() + sampled
    want = [_alone(cfg, params, base, adapters, r) for r in requests]
    engine = Engine(cfg, params, adapters, rows=2, max_len=32)
    finished = engine.run(requests)
    assert [f.tokens for f in finished] == want
    assert not engine.busy
    reasons = {f.reason for f in finished}
    assert reasons <= {"stop", "length"} and "length" in reasons


def test_live_coverage_equals_a_separate_forward_pass(served):
    """The coverage summed while decoding equals monitor.coverage over the tokens the model read:
    the prompt and every output token but a last one cut by max_tokens (float32 sums)."""
    cfg, params, _, adapters = served
    engine = Engine(cfg, params, adapters, rows=4, max_len=32)
    requests = _requests()
    finished = engine.run(requests)
    read = [f.tokens[:-1] if f.reason == "length" else f.tokens for f in finished]
    for f, want in zip(finished, engine.coverage(requests, read)):
        np.testing.assert_allclose(f.coverage.per_layer, want.per_layer, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(f.coverage.total, want.total, rtol=1e-5, atol=1e-7)
    assert finished[1].coverage.total > 0 and finished[0].coverage.total == 0.0


def test_a_cancelled_request_frees_its_row(served):
    """With one row, a long request cancelled after two tokens makes room for the next, which
    still gets its tokens alone; nothing is reported for the cancelled one after its cancel."""
    cfg, params, base, adapters = served
    engine = Engine(cfg, params, adapters, rows=1, max_len=32)
    assert engine.rows == 1
    long = engine.submit(Request([5, 6, 7], "wide", max_tokens=20))
    later = Request([9, 10, 11, 12], "partial", max_tokens=MAX_TOKENS)
    waiting = engine.submit(later)
    first = engine.step()  # the long one joins (its first token) and decodes one more
    assert [e.id for e in first] == [long, long] and first[-1].finished is None
    assert engine.cancel(long) and not engine.cancel(long)
    events = []
    while engine.busy:
        events += engine.step()
    assert {e.id for e in events} == {waiting}
    assert events[-1].finished.tokens == _alone(cfg, params, base, adapters, later)


def test_a_request_longer_than_a_row_is_refused(served):
    cfg, params, _, adapters = served
    engine = Engine(cfg, params, adapters, rows=2, max_len=16)
    with pytest.raises(ValueError, match="exceed the 16 tokens a request may hold"):
        engine.submit(Request(list(range(1, 12)), None, max_tokens=6))
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        engine.submit(Request([1, 2], "nope"))


def test_a_failure_fails_only_the_requests_it_concerns(served, monkeypatch):
    """Injected failures: a prefill that fails on one prompt's token (its group is retried one
    request at a time) and a decode that fails while a "partial" request is active (retried
    without the rows that joined that step). Only those two requests fail; the others, live
    before and joining beside them, get exactly their tokens alone."""
    from esft_jax.serve import batch

    cfg, params, base, adapters = served
    engine = Engine(cfg, params, adapters, rows=4, max_len=32)
    poison, partial = 255, engine.bank.index("partial")
    prefill, step = batch.prefill, batch.step

    def failing_prefill(params, tokens_np, *rest):
        if (np.asarray(tokens_np) == poison).any():
            raise RuntimeError("injected prefill failure")
        return prefill(params, tokens_np, *rest)

    def failing_step(params, state, trained_ale, sets_b, active_b, cfg):
        if (np.asarray(sets_b)[np.asarray(active_b)] == partial).any():
            raise RuntimeError("injected step failure")
        return step(params, state, trained_ale, sets_b, active_b, cfg)

    monkeypatch.setattr(batch, "prefill", failing_prefill)
    monkeypatch.setattr(batch, "step", failing_step)
    before = [Request([5, 6, 7], "wide", MAX_TOKENS), Request([8, 9], None, MAX_TOKENS, 0.9, 1, 3)]
    beside = Request([10, 11, 12, 13], "two_layers", MAX_TOKENS)
    ids = [engine.submit(r) for r in before]
    events = engine.step()  # both live
    bad_prompt = engine.submit(Request([1, poison, 2], "wide", MAX_TOKENS))
    ids.append(engine.submit(beside))
    bad_step = engine.submit(Request([3, 4], "partial", MAX_TOKENS))
    while engine.busy:
        events += engine.step()
    errors = {e.id: str(e.error) for e in events if e.error is not None}
    assert errors == {
        bad_prompt: "injected prefill failure",
        bad_step: "injected step failure",
    }
    last = {e.id: n for n, e in enumerate(events)}  # a failed request's error is its last event
    assert all(events[last[i]].error is not None for i in errors)
    finished = {e.id: e.finished.tokens for e in events if e.finished is not None}
    want = [_alone(cfg, params, base, adapters, r) for r in [*before, beside]]
    assert [finished[i] for i in ids] == want

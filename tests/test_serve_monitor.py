"""The routing monitor: the profile an adapter carries from selection to the server, the
out-of-domain flag and live statistics (in /metrics too: serve/metrics.py)."""

import json
import threading

import numpy as np
import pytest
import train_fixtures as fx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from esft_jax.app import config_files
from esft_jax.app.commands.select import select_experts
from esft_jax.checkpoint import load_checkpoint, load_tokenizer
from esft_jax.checkpoint.adapter import CONFIG_FILE, write_adapter
from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.expert_config import ExpertConfig, ExpertConfigError
from esft_jax.routing import profile
from esft_jax.routing.expected import expected_coverage
from esft_jax.routing.stats import RoutingStats
from esft_jax.serve.bank import build_bank
from esft_jax.serve.metrics import RoutingMetrics
from esft_jax.serve.monitor import Coverage, Monitor, MonitorError, coverage
from esft_jax.train.esft import ExpertSubset
from esft_jax.train.method import save_adapter


def _routing(rng, layers=3, experts=8, k=2, sequences=5):
    """Per sequence, per-token routing: ids [L, T, k] (distinct per token) and weights [L, T, k]."""
    out = []
    for _ in range(sequences):
        t = int(rng.integers(3, 12))
        ids = np.argsort(rng.random((layers, t, experts)), axis=-1)[..., :k]
        out.append((ids, rng.random((layers, t, k))))
    return out


def _stats(routing, layers, experts, k) -> RoutingStats:
    """RoutingStats of the routing, added as the profiler adds sequences."""
    stats = RoutingStats.empty(layers, experts, k)
    for ids, w in routing:
        counts = np.zeros((1, len(layers), experts))
        gates = np.zeros((1, len(layers), experts))
        for li in range(len(layers)):
            np.add.at(counts[0, li], ids[li].ravel(), 1)
            np.add.at(gates[0, li], ids[li].ravel(), w[li].ravel())
        stats.add(
            counts, gates, np.array([ids.shape[1]]), np.zeros((len(layers), experts, experts))
        )
    return stats


def test_expected_coverage_is_the_gate_mass_on_the_selection():
    """Against the serve-time quantity over every profiled token, in float64."""
    rng = np.random.default_rng(0)
    layers, chosen = [4, 5, 7], {4: [1, 6], 5: [], 7: [0, 2, 3]}
    routing = _routing(rng)
    got = expected_coverage(_stats(routing, layers, 8, 2), chosen)
    hit, mass = np.zeros(3), np.zeros(3)
    for ids, w in routing:
        for li, layer in enumerate(layers):
            on = np.isin(ids[li], chosen[layer])
            hit[li] += (w[li] * on).sum()
            mass[li] += w[li].sum()
    assert got["layers"] == layers and got["tokens"] == sum(ids.shape[1] for ids, _ in routing)
    np.testing.assert_allclose(got["per_layer"], hit / mass, rtol=1e-12)
    np.testing.assert_allclose(got["total"], hit.sum() / mass.sum(), rtol=1e-12)
    assert got["per_layer"][1] == 0.0 and json.loads(json.dumps(got)) == got
    every = expected_coverage(_stats(routing, layers, 8, 2), {x: list(range(8)) for x in layers})
    assert every["total"] <= 1.0 and np.allclose(every["per_layer"], 1.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny base model, its routing profiled on one sequence, an adapter selected and trained
    from that (with its profile, through the expert config file) and one without a profile."""
    root = tmp_path_factory.mktemp("monitor")
    cfg, params = load_checkpoint(fx.base_checkpoint(root / "base"))
    seq = np.random.default_rng(1).integers(3, 250, 40).astype(np.int32)
    stats = profile.collect(
        params,
        cfg,
        [profile.Sequence(seq, np.ones(seq.size, bool))],
        batch_size=1,
        seq_len=64,
        progress=False,
    )
    spec = config_files.load_file("configs/select.py:token")
    selected = select_experts(stats, spec, 0)
    path = selected.save(root / "experts.json")
    loaded = ExpertConfig.load(path, cfg.moe_layer_ids, cfg.n_routed_experts)
    adapters = {}
    for name, ec, scale in (("task", loaded, 1.5), ("hand", fx.EXPERTS, 1.5), ("same", loaded, 1)):
        method = ExpertSubset.build(cfg, ec)
        trainable = method.init(params)
        trainable["experts"] = {k: v * scale for k, v in trainable["experts"].items()}
        adapters[name] = save_adapter(root / name, cfg, method, params, trainable)
    return cfg, params, stats, selected, loaded, seq, adapters


def test_the_profile_travels_from_selection_to_the_bank(served):
    cfg, params, stats, selected, loaded, seq, adapters = served
    assert selected.profile == expected_coverage(stats, selected.experts)
    assert loaded == selected  # the expert config file round-trips, profile included
    meta = json.loads((adapters["task"] / CONFIG_FILE).read_text())
    assert meta["routing_profile"] == selected.profile
    assert "routing_profile" not in json.loads((adapters["hand"] / CONFIG_FILE).read_text())
    bank = build_bank(cfg, params, adapters)
    assert bank.profiles == (selected.profile, None, selected.profile)
    assert bank.profile("task") == selected.profile and bank.profile(None) is None
    # serving the profiled sequence itself with the selection's experts unchanged (the profile is
    # the base model's routing) gives the profiled coverage
    (cov,) = coverage(params, cfg, bank, [bank.index("same")], [seq.tolist()])
    np.testing.assert_allclose(cov.total, selected.profile["total"], rtol=1e-5)
    np.testing.assert_allclose(cov.per_layer, selected.profile["per_layer"], rtol=1e-5)
    assert 0.05 < cov.total < 0.95


def test_old_expert_configs_read_without_a_profile(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"experts": {"1": [3]}, "shared_experts": False}))
    ec = ExpertConfig.load(path, (1, 2, 3), 32)
    assert ec.profile is None and "profile" not in ec.to_json()


@pytest.mark.parametrize(
    "profile_json, message",
    [
        (
            {"layers": [1, 2, 3], "per_layer": [0.1, 0.2, 0.3], "total": 1.5, "tokens": 9},
            r"\[0, 1\]",
        ),
        ({"layers": [1, 2], "per_layer": [0.1, 0.2], "total": 0.1, "tokens": 9}, "MoE layers"),
        ({"layers": [1, 2, 3], "per_layer": [0.1, None, 0.3], "total": 0.1, "tokens": 9}, "None"),
        ({"layers": [1, 2, 3], "per_layer": [0.1], "total": 0.1, "tokens": 9}, "one share"),
        ({"layers": [1, 2, 3], "per_layer": [0, 0, 0], "total": 0, "tokens": -1}, "'tokens'"),
        ({"layers": [1, 2, 3], "total": 0.5}, "expected an object with keys"),
    ],
)
def test_a_bad_profile_is_a_one_line_error(served, tmp_path, profile_json, message):
    cfg, params, *_, adapters = served
    meta = json.loads((adapters["task"] / CONFIG_FILE).read_text())
    (tmp_path / "ok").mkdir()
    bad = tmp_path / "bad"
    from safetensors.numpy import load_file

    tensors = load_file(adapters["task"] / "adapter.safetensors")
    write_adapter(bad, tensors, {**meta, "routing_profile": profile_json})
    with pytest.raises(
        CheckpointError, match=f"bad/{CONFIG_FILE}: routing_profile: .*{message}"
    ) as e:
        build_bank(cfg, params, {"bad": bad})
    assert "\n" not in str(e.value)
    config = {"experts": {"1": [3]}, "profile": profile_json}
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(ExpertConfigError, match="c.json: profile: ") as e:
        ExpertConfig.load(tmp_path / "c.json", (1, 2, 3), 32)
    assert "\n" not in str(e.value)


def _monitor(served, **kwargs) -> Monitor:
    cfg, params, *_, adapters = served
    return Monitor(build_bank(cfg, params, adapters), layers=cfg.moe_layer_ids, **kwargs)


def _cov(total: float) -> Coverage:
    return Coverage(total, (total, total, total))


def test_flag_rule(served):
    """Flagged when one layer (of those the adapter trains) is below ood_ratio x its profile."""
    *_, selected, _, _, _ = served
    profiled = selected.profile["per_layer"]
    trains = [i for i, p in enumerate(profiled) if p > 0]
    assert trains
    for ratio in (0.5, 0.8):
        m = _monitor(served, ood_ratio=ratio)
        above = [ratio * p * 1.001 for p in profiled]
        assert not m.flagged("task", Coverage(0.0, tuple(above)))
        for layer in trains:  # one layer under its line flags, whatever the total
            one_low = [*above]
            one_low[layer] = ratio * profiled[layer] * 0.999
            assert m.flagged("task", Coverage(1.0, tuple(one_low)))
        assert not m.flagged("hand", _cov(0.0)) and not m.flagged(None, _cov(0.0))
    with pytest.raises(MonitorError, match="monitor.ood_ratio"):
        _monitor(served, ood_ratio=-1)


def test_snapshot_and_metrics_are_the_recorded_averages(served):
    m = _monitor(served)
    rng = np.random.default_rng(2)
    names = [None, "task", "hand"]
    records = [
        (
            names[int(rng.integers(3))],
            Coverage(float(x), tuple(rng.random(3))),
            *rng.integers(1, 50, 2),
        )
        for x in rng.random(40) * served[3].profile["total"]  # about half below the flag line
    ]

    def send(part):
        for name, cov, p, c in part:
            m.record(
                name,
                cov,
                prompt_tokens=p,
                completion_tokens=c,
                latency_s=0.5,
                flagged=m.flagged(name, cov),
                fallback=False,
            )

    threads = [threading.Thread(target=send, args=(records[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = m.snapshot()
    assert json.loads(json.dumps(snap)) == snap and snap["layers"] == [1, 2, 3]
    registry = CollectorRegistry()
    registry.register(RoutingMetrics(m))
    metrics = {
        (sample.name, *sorted(sample.labels.values())): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    for name, shown in zip(names, ["base", "task", "hand"]):
        mine = [r for r in records if r[0] == name]
        got = snap["models"][shown]
        assert got["requests"] == len(mine)
        np.testing.assert_allclose(got["coverage"], np.mean([r[1].total for r in mine]))
        np.testing.assert_allclose(got["per_layer"], np.mean([r[1].per_layer for r in mine], 0))
        assert got["tokens"] == sum(int(r[2] + r[3]) for r in mine)
        assert got["flagged"] == sum(m.flagged(name, r[1]) for r in mine)
        assert metrics["esft_requests_flagged_total", shown] == got["flagged"]
        assert metrics["esft_completion_tokens_total", shown] == got["completion_tokens"]
        np.testing.assert_allclose(metrics["esft_coverage_mean", shown], got["coverage"])
        np.testing.assert_allclose(
            metrics["esft_coverage_layer_mean", "2", shown], got["per_layer"][1]
        )
    assert 0 < snap["models"]["task"]["flagged"] < snap["models"]["task"]["requests"]
    assert snap["models"]["task"]["profiled"] == served[3].profile["total"]
    assert snap["models"]["hand"]["profiled"] is None and snap["models"]["base"]["profiled"] is None
    assert ("esft_coverage_profiled", "hand") not in metrics
    assert metrics["esft_coverage_profiled", "task"] == served[3].profile["total"]


def test_the_trained_adapters_profile_is_its_prompts_coverage(served, tmp_path):
    """train/routing_profile.measure (what esft train writes after training) against a float64 loop
    over each prompt alone through the merged model: prompt tokens only, answers not counted."""
    import jax

    from esft_jax.checkpoint.adapter import load_with_adapter
    from esft_jax.data.sources import read_samples
    from esft_jax.data.tokenize import encode
    from esft_jax.model import forward
    from esft_jax.train import routing_profile

    cfg, params, _, selected, _, _, adapters = served
    base = adapters["task"].parent / "base"  # the fixture's checkpoint
    _, merged = load_with_adapter(base, adapters["task"])
    samples, _ = read_samples(str(fx.task_dataset(tmp_path / "task.jsonl", n=12)), False)
    tokenizer = load_tokenizer(base)
    got = routing_profile.measure(
        merged, cfg, selected.experts, samples, tokenizer, tokens=10**6, seq_len=64, batch_size=4
    )
    trained = {cfg.moe_layer_ids.index(layer): e for layer, e in selected.experts.items()}
    hit, mass, tokens = np.zeros(cfg.num_moe_layers), np.zeros(cfg.num_moe_layers), 0
    for sample in samples:
        [(ids, answer)] = encode(tokenizer, sample, cfg)
        _, routing = jax.jit(forward, static_argnums=2)(merged, ids[None], cfg)
        w = np.asarray(routing.gate_weights, np.float64)[:, 0] * ~answer[None, :, None]
        on = np.asarray(routing.expert_ids)[:, 0]
        for li in range(cfg.num_moe_layers):
            hit[li] += (w[li] * np.isin(on[li], trained.get(li, []))).sum()
            mass[li] += w[li].sum()
        tokens += int((~answer).sum())
    assert got["tokens"] == tokens and got["layers"] == list(cfg.moe_layer_ids)
    np.testing.assert_allclose(got["per_layer"], hit / mass, rtol=1e-5)
    np.testing.assert_allclose(got["total"], hit.sum() / mass.sum(), rtol=1e-5)

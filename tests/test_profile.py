"""Profiling: exact token budget, batch- and device-independent statistics, official log output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esft_jax import configs, sharding
from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.data.records import Sample
from esft_jax.model import forward, init_params
from esft_jax.routing import profile
from esft_jax.routing.official_logs import OfficialLogWriter, read_official_logs

WORDS = "alpha beta gamma delta law court intent slot json weather music play stop route".split()


@pytest.fixture(scope="module")
def setup():
    cfg = configs.model_config(configs.load_file("configs/models/tiny.py"))
    params = init_params(cfg, jax.random.key(0))
    params["moe_layers"]["moe"]["router"] *= 15
    rng = np.random.default_rng(0)
    samples = [Sample(f"User: {' '.join(rng.choice(WORDS, rng.integers(2, 9)))}\n\nAssistant:",
                      " " + " ".join(rng.choice(WORDS, rng.integers(1, 12))), f"gen:{i}") for i in range(30)]
    return cfg, params, samples


def _seqs(setup, **kw):
    cfg, _, samples = setup
    args = dict(seq_len=64, token_budget=1500, seed=3)
    return profile.sequences(samples, byte_tokenizer(), cfg, **{**args, **kw})


def test_token_budget_is_exact(setup):
    assert sum(int(s.counted.sum()) for s in _seqs(setup)) == 1500
    answer_only = _seqs(setup, count="answer", token_budget=200)
    assert sum(int(s.counted.sum()) for s in answer_only) == 200
    assert all(not s.counted[0] for s in answer_only)  # BOS and prompt are read, not counted
    everything = _seqs(setup, token_budget=10 ** 9)
    assert len(everything) == 30 and all(s.ids.size <= 64 for s in everything)
    assert [s.ids.tolist() for s in _seqs(setup)] == [s.ids.tolist() for s in _seqs(setup)]  # seeded
    assert [s.ids.tolist() for s in _seqs(setup)] != [s.ids.tolist() for s in _seqs(setup, seed=4)]


def test_stats_equal_a_direct_count_per_sequence(setup):
    cfg, params, _ = setup
    seqs = _seqs(setup, count="answer")
    stats = profile.profile(params, cfg, seqs, batch_size=4, seq_len=64, progress=False)
    counts = np.zeros_like(stats.counts)
    gates = np.zeros_like(stats.gate_sum)
    run = jax.jit(forward, static_argnums=2)
    for seq in seqs:  # each sequence alone, counted with NumPy
        n = seq.ids.size
        tokens, segments = np.zeros((1, 64), np.int32), np.zeros((1, 64), np.int32)
        tokens[0, :n], segments[0, :n] = seq.ids, 1
        _, routing = run(params, jnp.asarray(tokens), cfg, segment_ids_bt=jnp.asarray(segments))
        ids = np.asarray(routing.expert_ids)[:, 0, :n][:, seq.counted]
        w = np.asarray(routing.gate_weights)[:, 0, :n][:, seq.counted]
        for l in range(ids.shape[0]):
            np.add.at(counts[l], ids[l].reshape(-1), 1)
            np.add.at(gates[l], ids[l].reshape(-1), w[l].reshape(-1))
    np.testing.assert_array_equal(stats.counts, counts)
    np.testing.assert_allclose(stats.gate_sum, gates, rtol=1e-5)
    assert stats.tokens == sum(int(s.counted.sum()) for s in seqs) and stats.sequences == len(seqs)
    assert stats.layers == [1, 2, 3]


def test_stats_do_not_depend_on_batch_size_or_device_count(setup):
    cfg, params, _ = setup
    seqs = _seqs(setup)
    one = profile.profile(params, cfg, seqs, batch_size=1, seq_len=64, progress=False)
    eight = profile.profile(params, cfg, seqs, batch_size=8, seq_len=64, progress=False)
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = sharding.make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
    sharded = profile.profile(params, cfg, seqs, batch_size=8, seq_len=64, mesh=mesh, progress=False)
    for other in (eight, sharded):
        np.testing.assert_array_equal(other.counts, one.counts)
        np.testing.assert_array_equal(other.coactivation, one.coactivation)
        for field in ("gate_sum", "seq_count_frac", "seq_gate_frac"):
            np.testing.assert_allclose(getattr(other, field), getattr(one, field), rtol=1e-5)  # float32 sums
        assert (other.tokens, other.sequences) == (one.tokens, one.sequences) == (1500, len(seqs))


def test_official_log_output_reads_back(setup, tmp_path):
    cfg, params, _ = setup
    seqs = _seqs(setup, token_budget=400)
    writer = OfficialLogWriter(tmp_path, [1, 2, 3])
    stats = profile.profile(params, cfg, seqs, batch_size=3, seq_len=64, log_writer=writer, progress=False)
    writer.close()
    back = read_official_logs(tmp_path, top_k=cfg.num_experts_per_tok, num_experts=cfg.n_routed_experts)
    assert (back.tokens, back.sequences, back.layers) == (stats.tokens, stats.sequences, stats.layers)
    np.testing.assert_array_equal(back.counts, stats.counts)
    np.testing.assert_allclose(back.gate_sum, stats.gate_sum, atol=5e-5 * stats.tokens)  # 4-decimal weights


def test_shards_split_the_documents_and_the_budget(setup):
    cfg, params, _ = setup
    halves = [_seqs(setup, shard=(i, 2)) for i in range(2)]
    assert [sum(int(s.counted.sum()) for s in half) for half in halves] == [750, 750]
    whole = [s.ids.tolist() for s in _seqs(setup, token_budget=10 ** 9)]  # the shuffled order
    for i, half in enumerate(halves):  # shard i: the documents i, i + 2, ... of that order (the last one cut)
        assert [s.ids.tolist() for s in half[:-1]] == whole[i::2][:len(half) - 1]
    # one process reading both shards (side by side in each batch) counts what the halves count alone
    read = lambda index, count: _seqs(setup, shard=(index, count))  # noqa: E731
    both = profile.profile(params, cfg, read, batch_size=4, seq_len=64, shards=2, progress=False)
    alone = [profile.profile(params, cfg, half, batch_size=2, seq_len=64, progress=False) for half in halves]
    assert both.tokens == 1500 and both.sequences == sum(len(h) for h in halves)
    np.testing.assert_array_equal(both.counts, alone[0].counts + alone[1].counts)
    np.testing.assert_allclose(both.gate_sum, alone[0].gate_sum + alone[1].gate_sum, rtol=1e-5)

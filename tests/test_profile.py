"""Profiling: exact token budget, packed documents counted as if alone, batch- and device-independent
statistics, official log output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_float32_close, model_roundings

from esft_jax import sharding
from esft_jax.app import config_files
from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.data.records import Sample
from esft_jax.model import forward, init_params, param_axes
from esft_jax.routing import profile
from esft_jax.routing.official_logs import OfficialLogWriter, read_layer_log, read_official_logs
from esft_jax.routing.stats import RoutingStats

WORDS = "alpha beta gamma delta law court intent slot json weather music play stop route".split()


@pytest.fixture(scope="module")
def setup():
    cfg = config_files.model_config(config_files.load_file("configs/models/tiny.py"))
    params = init_params(cfg, jax.random.key(0))
    params["moe_layers"]["moe"]["router"] *= 15
    rng = np.random.default_rng(0)
    samples = [
        Sample(
            f"User: {' '.join(rng.choice(WORDS, rng.integers(2, 9)))}\n\nAssistant:",
            " " + " ".join(rng.choice(WORDS, rng.integers(1, 12))),
            f"gen:{i}",
        )
        for i in range(30)
    ]
    return cfg, params, samples


@pytest.fixture(scope="module")
def short(setup):
    """Short documents (and a long one every 20) that pack several to a row at seq_len 256."""
    cfg, params, _ = setup
    rng = np.random.default_rng(1)
    samples = [
        Sample(
            f"User: {' '.join(rng.choice(WORDS, 12 if i % 20 == 0 else rng.integers(1, 3)))}\n\nA:",
            " " + " ".join(rng.choice(WORDS, rng.integers(1, 3))),
            f"gen:{i}",
        )
        for i in range(80)
    ]
    return cfg, params, samples


def _seqs(setup, **kw):
    cfg, _, samples = setup
    args = dict(seq_len=64, token_budget=1500, seed=3)
    return profile.sequences(samples, byte_tokenizer(), cfg, **{**args, **kw})


def _alone(params, cfg, seqs, seq_len: int) -> RoutingStats:
    """The reference: every document alone in its own row padded to seq_len, counted with NumPy."""
    rows = -(-len(seqs) // 64) * 64  # one compilation for any number of documents up to 64
    tokens, segments = np.zeros((rows, seq_len), np.int32), np.zeros((rows, seq_len), np.int32)
    for row, seq in enumerate(seqs):
        tokens[row, : seq.ids.size], segments[row, : seq.ids.size] = seq.ids, 1
    _, routing = jax.jit(forward, static_argnums=2)(
        params, jnp.asarray(tokens), cfg, segment_ids_bt=jnp.asarray(segments)
    )
    # [L, n, T, k]
    ids_all, w_all = (
        np.asarray(routing.expert_ids),
        np.asarray(routing.gate_weights),
    )
    e = cfg.n_routed_experts
    ref = RoutingStats.empty(
        list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers)), e, cfg.num_experts_per_tok
    )
    for row, seq in enumerate(seqs):
        ids, w = (
            ids_all[:, row, : seq.ids.size][:, seq.counted],
            w_all[:, row, : seq.ids.size][:, seq.counted],
        )
        counts, gates = np.zeros((1, ids.shape[0], e)), np.zeros((1, ids.shape[0], e))
        hot = np.zeros((*ids.shape[:2], e), np.int64)  # [L, n, E]
        for li in range(ids.shape[0]):
            np.add.at(counts[0, li], ids[li].reshape(-1), 1)
            np.add.at(gates[0, li], ids[li].reshape(-1), w[li].reshape(-1))
            np.put_along_axis(hot[li], ids[li], 1, axis=1)
        ref.add(counts, gates, np.array([ids.shape[1]]), np.einsum("lne,lnf->lef", hot, hot))
    return ref


def _assert_same(stats: RoutingStats, ref: RoutingStats) -> None:
    np.testing.assert_array_equal(stats.counts, ref.counts)
    np.testing.assert_array_equal(stats.coactivation, ref.coactivation)
    tiny = config_files.model_config(config_files.load_file("configs/models/tiny.py"))
    # the forward, then a sum over the tokens
    n_roundings = model_roundings(tiny) + np.sqrt(ref.tokens)
    for field in ("gate_sum", "seq_count_frac", "seq_gate_frac"):
        assert_float32_close(getattr(stats, field), getattr(ref, field), n_roundings, err_msg=field)
    assert (stats.tokens, stats.sequences, stats.layers) == (ref.tokens, ref.sequences, ref.layers)


def test_token_budget_is_exact(setup):
    assert sum(int(s.counted.sum()) for s in _seqs(setup)) == 1500
    answer_only = _seqs(setup, count="answer", token_budget=200)
    assert sum(int(s.counted.sum()) for s in answer_only) == 200
    assert all(not s.counted[0] for s in answer_only)  # BOS and prompt are read, not counted
    everything = _seqs(setup, token_budget=10**9)
    assert len(everything) == 30 and all(s.ids.size <= 64 for s in everything)
    assert [s.ids.tolist() for s in _seqs(setup)] == [
        s.ids.tolist() for s in _seqs(setup)
    ]  # seeded
    assert [s.ids.tolist() for s in _seqs(setup)] != [s.ids.tolist() for s in _seqs(setup, seed=4)]


def test_packing_keeps_the_documents_in_order_in_rows_that_hold_them(short):
    seqs = _seqs(short, seq_len=256)
    row_len = profile.row_length(seqs, 256)
    # the long document sets it
    assert row_len == 128 and max(s.ids.size for s in seqs) in range(65, 129)
    rows = profile.pack(seqs, row_len)
    assert [s for row in rows for s in row] == seqs  # every document once, in order
    sizes = [[s.ids.size for s in row] for row in rows]
    assert all(sum(row) <= row_len for row in sizes)
    # a row closes when full
    assert all(sum(row) + nxt[0] > row_len for row, nxt in zip(sizes, sizes[1:]))
    assert max(len(row) for row in rows) >= 3 and len(rows) < len(seqs) / 2
    assert (
        profile.row_length(seqs, 100) == 100
        and profile.row_length(_seqs(short, seq_len=32), 32) == 32
    )


def test_packed_stats_equal_each_document_counted_alone(short):
    cfg, params, _ = short
    for count, budget in (("answer", 500), ("all", 1500)):
        seqs = _seqs(short, seq_len=256, count=count, token_budget=budget)
        stats = profile.collect(params, cfg, seqs, batch_size=2, seq_len=256, progress=False)
        _assert_same(stats, _alone(params, cfg, seqs, 256))
        assert stats.tokens == budget and stats.sequences == len(seqs) and stats.layers == [1, 2, 3]


def test_stats_do_not_depend_on_batch_size_device_count_or_seq_len(short):
    cfg, params, _ = short
    seqs = _seqs(short, seq_len=256)
    one = profile.collect(params, cfg, seqs, batch_size=1, seq_len=256, progress=False)
    others = [profile.collect(params, cfg, seqs, batch_size=8, seq_len=256, progress=False)]
    # no document reaches 256 tokens: at 4096 they are the same documents, packed into the same rows
    assert [s.ids.tolist() for s in _seqs(short, seq_len=4096)] == [s.ids.tolist() for s in seqs]
    others.append(profile.collect(params, cfg, seqs, batch_size=1, seq_len=4096, progress=False))
    if jax.device_count() >= 8:
        mesh = sharding.make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
        others.append(
            profile.collect(
                sharding.shard_params(params, param_axes(cfg), mesh),
                cfg,
                seqs,
                batch_size=8,
                seq_len=256,
                mesh=mesh,
                progress=False,
            )
        )
    for other in others:
        _assert_same(other, one)
    assert (one.tokens, one.sequences) == (1500, len(seqs))
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")


def test_official_log_output_reads_back(short, tmp_path):
    cfg, params, _ = short
    seqs = _seqs(short, seq_len=256, token_budget=400)
    writer = OfficialLogWriter(tmp_path, [1, 2, 3])
    stats = profile.collect(
        params, cfg, seqs, batch_size=3, seq_len=256, log_writer=writer, progress=False
    )
    writer.close()
    back = read_official_logs(
        tmp_path, top_k=cfg.num_experts_per_tok, num_experts=cfg.n_routed_experts
    )
    assert (back.tokens, back.sequences, back.layers) == (
        stats.tokens,
        stats.sequences,
        stats.layers,
    )
    np.testing.assert_array_equal(back.counts, stats.counts)
    # 4-decimal weights
    np.testing.assert_allclose(back.gate_sum, stats.gate_sum, atol=5e-5 * stats.tokens)
    lines = read_layer_log(
        tmp_path / "expert_weights_1.txt", cfg.num_experts_per_tok, cfg.n_routed_experts
    )
    assert [ids.shape[0] for ids, _ in lines] == [
        int(s.counted.sum()) for s in seqs
    ]  # one line per document


def test_shards_split_the_documents_and_the_budget(setup):
    cfg, params, _ = setup
    halves = [_seqs(setup, shard=(i, 2)) for i in range(2)]
    assert [sum(int(s.counted.sum()) for s in half) for half in halves] == [750, 750]
    whole = [s.ids.tolist() for s in _seqs(setup, token_budget=10**9)]  # the shuffled order
    for i, half in enumerate(
        halves
    ):  # shard i: the documents i, i + 2, ... of that order (the last one cut)
        assert [s.ids.tolist() for s in half[:-1]] == whole[i::2][: len(half) - 1]
    # one process reading both shards (side by side in each batch) counts what the halves count alone
    read = lambda index, count: _seqs(setup, shard=(index, count))  # noqa: E731
    both = profile.collect(params, cfg, read, batch_size=4, seq_len=64, shards=2, progress=False)
    alone = [
        profile.collect(params, cfg, half, batch_size=2, seq_len=64, progress=False)
        for half in halves
    ]
    assert both.tokens == 1500 and both.sequences == sum(len(h) for h in halves)
    np.testing.assert_array_equal(both.counts, alone[0].counts + alone[1].counts)
    assert_float32_close(
        both.gate_sum, alone[0].gate_sum + alone[1].gate_sum, model_roundings(cfg) + np.sqrt(1500)
    )

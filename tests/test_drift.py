"""Routing drift (esft_jax/routing/drift.py, `esft analyze --config.drift.*`) and the profile of a
fine-tuned model (`esft profile --config.adapter=...`): the Jensen-Shannon distance against scipy and
an entropy formula, known answers of a hand-built pair of statistics, and the CLI on the tiny model."""

import numpy as np
import pytest
import train_fixtures as fx

from esft_jax.app import cli
from esft_jax.expert_config import ExpertConfig
from esft_jax.routing import drift
from esft_jax.routing.sources import load_stats
from esft_jax.routing.stats import RoutingStats


def entropy_js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """sqrt(H(m) - (H(p) + H(q)) / 2) in bits, m the mixture: another form of the same divergence."""
    p, q = np.asarray(p, np.float64) / np.sum(p), np.asarray(q, np.float64) / np.sum(q)

    def h(x):
        x = x[x > 0]
        return -(x * np.log2(x)).sum()

    return float(np.sqrt(max(h((p + q) / 2) - (h(p) + h(q)) / 2, 0.0)))


def _edge_cases() -> tuple[np.ndarray, np.ndarray]:
    """Rows of (p, q): identical, disjoint, one-hot vs uniform, zeros on both sides, zeros on one
    side, unnormalised counts."""
    p = [[1, 2, 3, 4], [1, 1, 0, 0], [1, 0, 0, 0], [0, 3, 0, 1], [0, 1, 1, 2], [10, 30, 0, 60]]
    q = [[1, 2, 3, 4], [0, 0, 2, 5], [1, 1, 1, 1], [0, 1, 0, 3], [1, 1, 1, 1], [1, 3, 0, 6]]
    return np.array(p, np.float64), np.array(q, np.float64)


def test_js_distance_matches_scipy_and_the_entropy_form():
    rng = np.random.default_rng(0)
    random_p = rng.random((20, 16)) * (rng.random((20, 16)) < 0.7)  # ~30% zero entries
    random_q = rng.random((20, 16)) * (rng.random((20, 16)) < 0.7)
    random_p[:, 0] += 0.1  # no row all zero
    random_q[:, 1] += 0.1
    edge_p, edge_q = _edge_cases()
    edges = drift.js_distance(edge_p, edge_q)
    assert edges[0] == 0.0 and edges[1] == 1.0  # identical; disjoint supports
    assert edges[5] == 0.0  # the same distribution as counts of another total
    scipy_distance = _scipy_distance()
    for p, q in ((random_p, random_q), (edge_p, edge_q)):
        got = drift.js_distance(p, q)
        assert got.dtype == np.float64 and got.shape == (len(p),)
        want = [entropy_js_distance(a, b) for a, b in zip(p, q)]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(drift.js_distance(q, p), got, rtol=0, atol=1e-15)  # symmetric
        if scipy_distance is not None:
            want = [scipy_distance.jensenshannon(a, b, base=2) for a, b in zip(p, q)]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def _scipy_distance():
    """scipy.spatial.distance where scipy is installed (not a dependency), else None."""
    try:
        from scipy.spatial import distance
    except ImportError:
        return None
    return distance


@pytest.mark.parametrize(
    "row", [[0.0, 0.0, 0.0], [0.5, -0.1, 0.6]], ids=["empty layer", "negative entry"]
)
def test_js_distance_refuses_what_is_not_a_distribution(row):
    with pytest.raises(ValueError, match="non-negative entries and a positive sum"):
        drift.js_distance(np.array([row]), np.ones((1, 3)))


def _stats(counts_le, gate_e, layers=(1, 2, 3), tokens: int = 10) -> RoutingStats:
    """Top-1 statistics of one sequence of `tokens` tokens, a choice of expert e weighing gate_e[e]."""
    counts = np.array(counts_le, np.int64)
    s = RoutingStats.empty(list(layers), counts.shape[1], top_k=1)
    s.add(counts[None], counts[None] * np.asarray(gate_e), np.array([tokens]), s.coactivation)
    return s


# per layer, before -> after (top-1, 10 tokens): partly moved, moved to other experts, unchanged;
# after fine-tuning experts 2 and 3 get half the gate weight they got before
BEFORE, BEFORE_GATE = [[4, 3, 2, 1], [6, 4, 0, 0], [5, 3, 2, 0]], 0.5
AFTER, AFTER_GATE = [[1, 6, 3, 0], [0, 0, 4, 6], [5, 3, 2, 0]], [0.5, 0.5, 0.25, 0.25]


def test_a_hand_built_pair_gives_the_known_answers():
    before, after = _stats(BEFORE, BEFORE_GATE), _stats(AFTER, AFTER_GATE)
    d = drift.compare(before, after, None, "token", 0.6)
    # token scores are counts / 10; the smallest sets reaching 0.6: {0, 1}, {0}, {0, 1} before;
    # {1}, {3}, {0, 1} after
    assert d.selected_before == [[0, 1], [0], [0, 1]]
    assert d.selected_after == [[1], [3], [0, 1]]
    np.testing.assert_allclose(d.jaccard_l, [1 / 2, 0, 1])
    np.testing.assert_allclose(d.kept_l, [1 / 2, 0, 1])
    # layer 1: p = (.4, .3, .2, .1), q = (.1, .6, .3, 0), m = (.25, .45, .25, .05); of the counts,
    # not the gate sums
    kl_p = 0.4 * np.log2(1.6) + 0.3 * np.log2(2 / 3) + 0.2 * np.log2(0.8) + 0.1 * np.log2(2)
    kl_q = 0.1 * np.log2(0.4) + 0.6 * np.log2(4 / 3) + 0.3 * np.log2(1.2)
    np.testing.assert_allclose(
        d.js_distance_l, [np.sqrt((kl_p + kl_q) / 2), 1.0, 0.0], rtol=0, atol=1e-15
    )
    # coverage of before's selection, in gate mass: before (4+3)/10, 6/10, 8/10; after the gate sums
    # are (.5, 3, .75, 0), (0, 0, 1, 1.5), (2.5, 1.5, .5, 0)
    assert d.experts == {1: [0, 1], 2: [0], 3: [0, 1]}
    np.testing.assert_allclose(d.coverage_before_l, [0.7, 0.6, 0.8])
    np.testing.assert_allclose(d.coverage_after_l, [3.5 / 4.25, 0.0, 4 / 4.5])
    assert d.coverage_before == pytest.approx(0.7) and d.coverage_after == pytest.approx(2 / 3)

    given = drift.compare(before, after, {1: [3], 2: [2]}, "token", 0.6)  # an adapter's experts
    np.testing.assert_allclose(given.coverage_before_l, [0.1, 0.0, 0.0])
    np.testing.assert_allclose(given.coverage_after_l, [0.0, 0.4, 0.0])
    assert given.coverage_before == pytest.approx(0.5 / 15)
    assert given.coverage_after == pytest.approx(1 / 11.25)

    lines = drift.table(d).splitlines()
    assert lines[0].startswith("Routing drift: experts selected by token scores (pooled) at p=0.6")
    assert lines[4:] == [
        "| 1 | 2 | 1 | 0.500 | 0.500 | 0.404 | 0.700 | 0.824 | +0.124 |",
        "| 2 | 1 | 1 | 0.000 | 0.000 | 1.000 | 0.600 | 0.000 | -0.600 |",
        "| 3 | 2 | 2 | 1.000 | 1.000 | 0.000 | 0.800 | 0.889 | +0.089 |",
        "| all | 5 | 4 | 0.500 | 0.500 | 0.468 | 0.700 | 0.667 | -0.033 |",
    ]


def test_identical_statistics_do_not_drift(tmp_path):
    rng = np.random.default_rng(1)
    s = RoutingStats.empty([1, 2, 3, 4], num_experts=16, top_k=4)
    counts_sle = rng.integers(0, 9, (5, 4, 16))
    s.add(
        counts_sle, counts_sle * rng.random((5, 4, 16)), np.array([9, 12, 7, 30, 4]), s.coactivation
    )
    for score, norm in (("token", "pooled"), ("gate", "paper")):
        d = drift.compare(s, s, None, score, 0.3, norm)
        assert (d.js_distance_l == 0).all() and (d.jaccard_l == 1).all() and (d.kept_l == 1).all()
        assert (d.coverage_after_l == d.coverage_before_l).all()
        assert d.coverage_after == d.coverage_before > 0
    assert drift.plot(d, tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"


def test_statistics_of_another_model_are_refused():
    before = _stats(BEFORE, BEFORE_GATE)
    with pytest.raises(drift.StatsMismatch, match=r"layers is \[1, 2, 4\] here but \[1, 2, 3\]"):
        drift.compare(before, _stats(BEFORE, BEFORE_GATE, layers=(1, 2, 4)))
    with pytest.raises(drift.StatsMismatch, match="num_experts is 5 here but 4"):
        drift.compare(before, _stats(np.pad(BEFORE, ((0, 0), (0, 1))), 0.5))


def _analyze(capsys, out, *drift_keys: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(
        ["analyze", "--config", "configs/analyze.py:drift", f"--config.out_dir={out}", *drift_keys]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_drift_keys_are_refused_in_one_line(tmp_path, capsys):
    before = _stats(BEFORE, BEFORE_GATE).save(tmp_path / "before.npz")
    other = _stats(BEFORE, BEFORE_GATE, layers=(1, 2, 4)).save(tmp_path / "other.npz")
    foreign = ExpertConfig({7: [0]}).save(tmp_path / "foreign.json")
    both = [f"--config.drift.before={before}", f"--config.drift.after={before}"]
    cases = {
        (): "--config.tasks: name at least one task",
        (f"--config.drift.before={before}",): "--config.drift.after: name the routing statistics",
        (f"--config.drift.after={before}",): "--config.drift.before: name the routing statistics",
        (f"--config.drift.before={tmp_path / 'none'}", both[1]): "--config.drift.before=",
        (*both, "--config.drift.score=count"): "--config.drift.score='count': expected one of",
        (*both, "--config.drift.norm=mean"): "--config.drift.norm='mean': expected one of",
        (*both, "--config.drift.p=0"): "--config.drift.p=0.0: expected a number in (0, 1]",
        (*both, f"--config.drift.experts={tmp_path / 'no.json'}"): "--config.drift.experts=",
        (*both, f"--config.drift.experts={foreign}"): f'{foreign}: experts["7"]: layer 7 is not',
        (both[0], f"--config.drift.after={other}"): f"--config.drift.after={other}: layers is",
    }
    for keys, says in cases.items():
        code, out, err = _analyze(capsys, tmp_path / "out", *keys)
        assert code == 2 and err.count("\n") == 1 and says in err, (keys, err)
        assert err.startswith("esft analyze: error: ")
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A task profiled through the tiny base, the base + an ESFT adapter of it (two experts of MoE
    layer 2 changed), and that adapter's merged export: {name: profile directory}."""
    root = tmp_path_factory.mktemp("drift")
    base = fx.base_checkpoint(root / "base")
    adapter = fx.fake_esft_adapter(base, root / "adapter")
    merged = root / "merged"
    assert cli.main(
        ["export", "--config", "configs/export.py", f"--config.checkpoint={base}",
         f"--config.adapter={adapter}", f"--config.out={merged}"]
    ) == 0  # fmt: skip
    data = fx.task_dataset(root / "task.jsonl", n=32)
    models = {
        "before": [f"--config.checkpoint={base}"],
        "after": [f"--config.checkpoint={base}", f"--config.adapter={adapter}"],
        "merged": [f"--config.checkpoint={merged}"],
    }
    for name, model in models.items():
        assert cli.main(
            ["profile", "--config", "configs/profile.py", f"--config.data={data}",
             "--config.seq_len=64", "--config.token_budget=600", "--config.progress=False",
             f"--config.out_dir={root / name}", *model]
        ) == 0  # fmt: skip
    return {name: root / name for name in models} | {"root": root}


def test_profile_of_base_and_adapter_is_the_profile_of_the_merged_export(profiled):
    after, merged = load_stats(profiled["after"]), load_stats(profiled["merged"])
    for field in ("counts", "gate_sum", "seq_count_frac", "seq_gate_frac", "coactivation"):
        np.testing.assert_array_equal(getattr(after, field), getattr(merged, field), err_msg=field)
    assert (after.tokens, after.layers) == (merged.tokens, merged.layers) == (600, [1, 2, 3])
    # the adapter changes layer 2's experts: the routing of layers 1 and 2 is the base's, layer 3's not
    before = load_stats(profiled["before"])
    np.testing.assert_array_equal(before.counts[:2], after.counts[:2])
    assert (before.counts[2] != after.counts[2]).any()


def test_analyze_writes_and_prints_the_drift(profiled, capsys):
    experts = ExpertConfig({2: [3, 5]}).save(profiled["root"] / "experts.json")  # the adapter's
    out = profiled["root"] / "analysis"
    code, printed, err = _analyze(
        capsys,
        out,
        f"--config.drift.before={profiled['before']}",
        f"--config.drift.after={profiled['after']}",
        f"--config.drift.experts={experts}",
        "--config.drift.p=0.3",
    )
    assert code == 0, err
    table = (out / "drift.md").read_text()
    assert printed.startswith(table) and (out / "drift.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "routing.md").exists()  # no tasks named: the drift only
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[4:]]
    rows = {row[0]: row[1:] for row in cells}
    assert list(rows) == ["1", "2", "3", "all"]
    # layers 1-2 route as before (JS 0, same sets), layer 3 moved; layer 2 holds all the coverage
    assert rows["1"][2:5] == rows["2"][2:5] == ["1.000", "1.000", "0.000"]
    assert float(rows["3"][4]) > 0 and rows["2"][7] == "+0.000"
    assert rows["1"][5:] == rows["3"][5:] == ["0.000", "0.000", "+0.000"]
    want = drift.compare(
        load_stats(profiled["before"]), load_stats(profiled["after"]), {2: [3, 5]}, "token", 0.3
    )
    assert table == drift.table(want)


def test_profile_refuses_an_adapter_it_cannot_apply(tmp_path, capsys):
    data = fx.task_dataset(tmp_path / "task.jsonl", n=2)
    for model, says in (
        (f"--config.adapter={tmp_path / 'none'}", "--config.adapter="),
        ("--config.checkpoint=random", "applies to a checkpoint, not to random weights"),
    ):
        capsys.readouterr()
        argv = ["profile", "--config", "configs/profile.py", f"--config.data={data}"]
        argv += ["--config.checkpoint=random", f"--config.adapter={tmp_path}", model]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err

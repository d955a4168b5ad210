"""Expert scores against a float64 NumPy reference computed directly from per-token routing."""

import numpy as np
import pytest

from esft_jax.routing.official_logs import OfficialLogWriter, read_official_logs
from esft_jax.routing.scores import expert_scores

E, K = 16, 3


def _random_routing(seed=0, n_seq=7, layers=3):
    """Per sequence: ids [L, n, K] (distinct per token) and weights [L, n, K] (4 decimals)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_seq):
        n = int(rng.integers(3, 40))
        popular = rng.permutation(E)[:6]  # skewed routing, different per sequence
        ids = np.array([[_distinct(rng, popular) for _ in range(n)] for _ in range(layers)])
        weights = np.round(rng.uniform(0.01, 0.5, ids.shape), 4)
        seqs.append((ids, weights))
    return seqs


def _distinct(rng, popular):
    pool = popular if rng.random() < 0.7 else np.arange(E)
    return rng.choice(pool, K, replace=False)


def _reference(seqs, kind, norm):
    layers = seqs[0][0].shape[0]
    out = np.zeros((layers, E))
    for li in range(layers):
        if norm == "pooled":
            hits, total = np.zeros(E), 0
            for ids, w in seqs:
                for t in range(ids.shape[1]):
                    for j in range(K):
                        hits[ids[li, t, j]] += (1.0 / K) if kind == "token" else w[li, t, j]
                total += ids.shape[1]
            out[li] = hits / total
        else:  # the paper: mean over sequences of the per-sequence mean over tokens
            per_seq = []
            for ids, w in seqs:
                hits = np.zeros(E)
                for t in range(ids.shape[1]):
                    for j in range(K):
                        hits[ids[li, t, j]] += (1.0 / K) if kind == "token" else w[li, t, j]
                per_seq.append(hits / ids.shape[1])
            out[li] = np.mean(per_seq, axis=0)
    return out


@pytest.fixture(scope="module")
def stats_and_seqs(tmp_path_factory):
    seqs = _random_routing()
    log_dir = tmp_path_factory.mktemp("logs")
    writer = OfficialLogWriter(log_dir, [1, 2, 3])
    for ids, w in seqs:
        writer.add(ids, w)
    writer.close()
    return read_official_logs(log_dir, top_k=K, num_experts=E), seqs


@pytest.mark.parametrize("kind", ["token", "gate"])
@pytest.mark.parametrize("norm", ["pooled", "paper"])
def test_scores_match_numpy_reference(stats_and_seqs, kind, norm):
    stats, seqs = stats_and_seqs
    np.testing.assert_allclose(
        expert_scores(stats, kind, norm), _reference(seqs, kind, norm), rtol=1e-12, atol=1e-15
    )
    assert stats.layers == [1, 2, 3] and stats.sequences == len(seqs)


def test_normalisations_differ_and_rounding(stats_and_seqs):
    stats, _ = stats_and_seqs
    pooled, paper = expert_scores(stats, "token", "pooled"), expert_scores(stats, "token", "paper")
    assert not np.allclose(pooled, paper)  # sequences of different lengths weigh differently
    # each layer's token scores sum to 1: no cross-layer renormalising
    np.testing.assert_allclose(pooled.sum(1), 1.0)
    np.testing.assert_allclose(paper.sum(1), 1.0)
    rounded = expert_scores(stats, "gate", "pooled", decimals=4)
    np.testing.assert_array_equal(rounded, np.round(expert_scores(stats, "gate", "pooled"), 4))


def test_paper_scores_of_the_real_logs(reference):
    """The paper's formula on DeepSeek-V2-Lite's real routing, recomputed here straight from the text."""
    from esft_jax.routing.official_logs import read_official_logs

    log_dir = reference / "results/expert_scores/law"
    stats = read_official_logs(log_dir)
    for layer in (1, 13, 26):
        per_seq_token, per_seq_gate = [], []
        for line in (log_dir / f"expert_weights_{layer}.txt").read_text().splitlines():
            ids_txt, weights_txt = line.split("\t\t")
            ids = np.array(ids_txt.split("\t"), int)
            w = np.array(weights_txt.split("\t"), float)
            n = ids.size / 6
            per_seq_token.append(np.bincount(ids, minlength=64) / 6 / n)
            per_seq_gate.append(np.bincount(ids, weights=w, minlength=64) / n)
        i = stats.layers.index(layer)
        np.testing.assert_allclose(
            expert_scores(stats, "token", "paper")[i], np.mean(per_seq_token, 0), rtol=1e-12
        )
        np.testing.assert_allclose(
            expert_scores(stats, "gate", "paper")[i], np.mean(per_seq_gate, 0), rtol=1e-12
        )

"""Expert selection methods, the expert-config format, and the official configs reproduced."""

import json

import numpy as np
import pytest

from esft_jax.app import cli
from esft_jax.expert_config import ExpertConfig, ExpertConfigError
from esft_jax.routing import select


def test_threshold_ties_and_cumulative_rule():
    scores = np.array([[0.1, 0.3, 0.1, 0.3, 0.2], [0.05, 0.05, 0.05, 0.05, 0.8]])
    assert select.by_threshold(scores, 0.5) == [[1, 3], [4]]  # ties: lower id first
    assert select.by_threshold(scores, 0.61) == [[1, 3, 4], [4]]
    assert select.by_threshold(scores, 0.95) == [[1, 3, 4, 0, 2], [4, 0, 1, 2]]
    assert select.top_n(scores, 2) == [[1, 3], [4, 0]]
    with pytest.raises(ValueError):
        select.by_threshold(scores, 0.0)


def test_random_keeps_counts_and_is_seeded():
    scores = np.random.default_rng(0).dirichlet(np.ones(64) * 0.3, size=5)
    ref = select.by_threshold(scores, 0.2)
    a, b = (
        select.per_layer(scores, "random", p=0.2, seed=1),
        select.per_layer(scores, "random", p=0.2, seed=1),
    )
    assert a == b and a != select.per_layer(scores, "random", p=0.2, seed=2)
    assert [len(x) for x in a] == [len(x) for x in ref]
    assert all(len(set(x)) == len(x) for x in a)


def test_groups():
    scores = np.array([0.05, 0.4, 0.05, 0.1, 0.3, 0.1])
    assert select.group_experts(scores, None, 2) == [[0, 1], [2, 3], [4, 5]]
    coact = np.zeros((6, 6))
    coact[1, 5] = coact[5, 1] = 9  # 1 and 5 fire together; so do 4 and 0
    coact[4, 0] = coact[0, 4] = 7
    groups = select.group_experts(scores, coact, 2)
    assert groups == [[1, 5], [4, 0], [3, 2]]
    assert sorted(sum(groups, [])) == list(range(6))
    assert select.by_group_threshold(scores[None], [groups], 0.5) == [[1, 5]]
    assert select.by_group_threshold(scores[None], [groups], 0.51) == [[1, 5, 4, 0]]
    with pytest.raises(ValueError, match="does not divide"):
        select.group_experts(scores, None, 4)


def test_expert_config_validation(tmp_path):
    ok = {"experts": {"1": [3, 1], "2": [0]}, "shared_experts": False, "non_expert_modules": True}
    cfg = ExpertConfig.from_json(ok, range(1, 4), 8)
    assert cfg.experts == {1: [3, 1], 2: [0]} and cfg.non_expert_modules and cfg.num_selected() == 3
    assert ExpertConfig.load(cfg.save(tmp_path / "c.json")) == cfg
    cases = [
        (
            {"experts": {"0": [1]}},
            r'experts\["0"\]: layer 0 is not an MoE layer \(MoE layers are 1..3\)',
        ),
        ({"experts": {"2": [1, 8]}}, r'experts\["2"\]: expert id 8 out of range \[0, 8\)'),
        ({"experts": {"2": [1, 5, 1]}}, r'experts\["2"\]: expert 1 listed twice'),
        ({"experts": {"x": [1]}}, r'experts\["x"\]: layer keys must be layer numbers'),
        ({"experts": {"1": "1,2"}}, r'experts\["1"\]: expected a list of expert ids'),
        ({"experts": {}, "shared_experts": "yes"}, r"'shared_experts' must be true or false"),
        ({"experts": {}, "extra": 1}, r"unknown keys \['extra'\]"),
        ([1, 2], "expected an object with an 'experts' object"),
    ]
    for obj, message in cases:
        (tmp_path / "bad.json").write_text(json.dumps(obj))
        with pytest.raises(ExpertConfigError, match=f"bad.json: {message}"):
            ExpertConfig.load(tmp_path / "bad.json", range(1, 4), 8)
    (tmp_path / "bad.json").write_text('{"experts": {\n"1": [1,]}}')
    with pytest.raises(ExpertConfigError, match=r"bad.json:2: not valid JSON"):
        ExpertConfig.load(tmp_path / "bad.json")


@pytest.mark.parametrize("task", ["intent", "law"])
def test_official_expert_configs_reproduced(reference, tmp_path, task, capsys):
    """ESFT-Token, pooled, rounded to 4 decimals, p = 0.2, from the official logs: the official configs."""
    out = tmp_path / f"{task}.json"
    assert (
        cli.main(
            [
                "select",
                "--config",
                "configs/select.py:token",
                f"--config.stats={reference}/results/expert_scores/{task}",
                f"--config.out={out}",
            ]
        )
        == 0
    )
    official = json.loads((reference / f"results/expert_configs/{task}.json").read_text())
    ours = json.loads(out.read_text())
    # ours only: the selection's coverage (tests/test_serve_monitor.py)
    profile = ours.pop("profile")
    assert ours == official  # same layers, same experts in the same order, same flags
    assert profile["layers"] == list(range(1, 27)) and profile["tokens"] > 0
    per_layer = profile["per_layer"]
    assert min(per_layer) <= profile["total"] <= max(per_layer) <= 1
    assert "routed-expert parameters" in capsys.readouterr().out


def test_official_summary_reproduced(reference):
    from esft_jax.routing.official_logs import read_official_logs
    from esft_jax.routing.scores import official_summary

    log_dir = reference / "results/expert_scores/intent"
    summary = official_summary(read_official_logs(log_dir))
    official = json.loads((log_dir / "summary.json").read_text())
    assert summary["token_scores"] == official["token_scores"]
    assert summary["gate_scores"] == official["gate_scores"]

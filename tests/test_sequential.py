"""Sequential multi-domain ESFT with progressive freezing (app/sequential.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import train_fixtures as fx
from safetensors.numpy import load_file
from test_experiment import _train_here

from esft_jax.app import config_files, launch, sequential
from esft_jax.app.commands import run as experiment
from esft_jax.expert_config import ExpertConfig
from esft_jax.routing.stats import RoutingStats


def test_unfrozen_drops_what_earlier_tasks_trained_and_recomputes_the_profile():
    rng = np.random.default_rng(0)
    stats = RoutingStats.empty([1, 2], 8, 2)
    stats.counts[:] = rng.integers(1, 50, stats.counts.shape)
    stats.gate_sum[:] = stats.counts * 0.4
    stats.tokens = int(stats.counts.sum() // 2)
    chosen = ExpertConfig({1: [3, 5, 0], 2: [7]}, shared_experts=True)
    left = sequential.unfrozen(chosen, {1: {5}, 2: {7, 1}}, stats)
    assert left.experts == {1: [3, 0], 2: []} and left.shared_experts
    assert left.profile == sequential.expected_coverage(stats, {1: [3, 0], 2: []})
    assert left.profile != sequential.expected_coverage(stats, chosen.experts)


@pytest.mark.slow  # two trainings, three evaluations
def test_a_sequence_freezes_each_tasks_experts_for_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "_start", _train_here)
    c = config_files.load(
        "configs/experiments/sequential.py",
        [
            f"checkpoint={fx.base_checkpoint(tmp_path / 'base')}",
            f"run_dir={tmp_path / 'run'}",
            f"suite_dir={tmp_path / 'suite'}",
            "sequence=('math', 'sort')",
            "task=math",
            "selection.p=0.5",
            "eval.limit=4",
            "eval.batch_size=4",
            "profile.token_budget=500",
            "perplexity_set=''",
            "train=('steps=2', 'batch_size=2', 'data.seq_len=64', "
            "'log_every=1', 'eval_every=2', 'checkpoint_every=2')",
        ],
        command="run",
    )
    experiment.check(c)
    table = experiment.run(c).read_text()
    run = tmp_path / "run"
    first = ExpertConfig.load(run / "1_math" / "experts_sequence.json").experts
    second = ExpertConfig.load(run / "2_sort" / "experts_sequence.json").experts
    assert any(first.values()) and any(second.values())
    assert all(not set(first[layer]) & set(second.get(layer, [])) for layer in first)
    # the second task's training left the first task's experts as the first merge wrote them
    one, two = (load_file(run / d / "merged" / "model.safetensors") for d in ("1_math", "2_sort"))
    base = load_file(tmp_path / "base" / "model.safetensors")
    names = [
        f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"
        for layer, ids in first.items()
        for e in ids
    ]
    assert all(one[n].tobytes() == two[n].tobytes() for n in names)
    assert any(one[n].tobytes() != base[n].tobytes() for n in names)  # the first task trained them
    scores = {
        "math": json.loads((run / "1_math" / "eval.json").read_text()),
        "sort": json.loads((run / "2_sort" / "eval.json").read_text()),
    }
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table.splitlines()[2:]}
    assert list(rows) == ["base", "1. math", "2. sort", "forgetting"]
    assert float(rows["forgetting"][0]) == pytest.approx(
        scores["math"]["math"] - scores["sort"]["math"], abs=1e-3
    )

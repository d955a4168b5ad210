"""`esft run` end to end on a tiny random model: every step, the table, the plots, and the cache."""

import time

import pytest
import train_fixtures as fx

from esft_jax import configs, experiment


@pytest.mark.slow
def test_run_pipeline_and_rerun_from_cache(tmp_path):
    c = configs.load("configs/experiments/builtin.py:math", [
        f"checkpoint={fx.base_checkpoint(tmp_path / 'base')}", f"run_dir={tmp_path / 'run'}",
        f"suite_dir={tmp_path / 'suite'}", "eval.limit=4", "eval.batch_size=4", "profile.token_budget=500",
        "train=('steps=2', 'batch_size=2', 'data.seq_len=64', 'log_every=1', 'eval_every=2', 'checkpoint_every=2')"])
    table = experiment.run(c).read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert list(rows) == ["vanilla", "fft", "lora", "esft_token", "esft_gate"]
    assert "(100.0%)" in rows["fft"] and "MB" in rows["esft_token"]
    for name in ("routing_heatmap.png", "score_vs_params.png", "experts_token.json", "experts_gate.json"):
        assert (tmp_path / "run" / name).is_file()
    start = time.perf_counter()
    assert experiment.run(c).read_text() == table  # everything cached: nothing recomputed
    assert time.perf_counter() - start < 30

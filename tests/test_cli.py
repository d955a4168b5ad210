"""The `esft` commands end to end on the tiny model: profile -> select -> analyze."""

import json

import numpy as np

from esft_jax.app import cli
from esft_jax.app.commands import data as data_command
from esft_jax.expert_config import ExpertConfig


def _dataset(path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    words = "one two three four five six seven eight nine ten".split()
    with path.open("w") as f:
        for _ in range(n):
            user, answer = " ".join(rng.choice(words, 5)), " ".join(rng.choice(words, 4))
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": user},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                )
                + "\n"
            )
    return path


def test_profile_select_analyze(tmp_path, capsys):
    data = _dataset(tmp_path / "task.jsonl")
    common = [
        "--config.checkpoint=random",
        "--config.seq_len=64",
        "--config.token_budget=900",
        "--config.progress=False",
    ]
    assert (
        cli.main(
            [
                "profile",
                "--config",
                "configs/profile.py:tiny",
                f"--config.data={data}",
                f"--config.out_dir={tmp_path / 'a'}",
                "--config.official_logs=True",
                *common,
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "profile",
                "--config",
                "configs/profile.py:tiny",
                f"--config.data={data}",
                "--config.seed=1",
                f"--config.out_dir={tmp_path / 'b'}",
                "--config.count=answer",
                *common,
            ]
        )
        == 0
    )
    assert "profiled 900 tokens" in capsys.readouterr().out
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    assert list(summary["token_scores"]) == ["1", "2", "3"] and summary["tokens"] == 900
    assert sorted(p.name for p in (tmp_path / "a/logs").iterdir()) == [
        f"expert_weights_{layer}.txt" for layer in (1, 2, 3)
    ]

    out = tmp_path / "experts.json"
    assert (
        cli.main(
            [
                "select",
                "--config",
                "configs/select.py:gate",
                f"--config.stats={tmp_path / 'a'}",
                f"--config.out={out}",
                "--config.shared_experts=True",
            ]
        )
        == 0
    )
    cfg = ExpertConfig.load(out, range(1, 4), 32)
    assert cfg.shared_experts and sorted(cfg.experts) == [1, 2, 3] and cfg.num_selected() > 0
    table = capsys.readouterr().out.splitlines()[:3]  # experts selected per layer
    assert table[:2] == ["| layer | 1 | 2 | 3 |", "|---|---:|---:|---:|"]
    assert (
        table[2]
        == "| experts | " + " | ".join(str(len(cfg.experts[layer])) for layer in (1, 2, 3)) + " |"
    )
    assert (
        cli.main(
            [
                "select",
                "--config",
                "configs/select.py",
                f"--config.stats={tmp_path / 'a/logs'}",
                "--config.top_k=4",
                "--config.num_experts=32",
                f"--config.out={tmp_path / 'from_logs.json'}",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "select",
                "--config",
                "configs/select.py",
                f"--config.stats={tmp_path / 'a'}",
                f"--config.out={tmp_path / 'from_stats.json'}",
            ]
        )
        == 0
    )
    # token scores come from counts, which the logs keep exactly: both sources select the same
    # experts; the profiles' gate sums agree to the logs' rounding of the gate weights
    from_logs, from_stats = (
        json.loads((tmp_path / f"from_{source}.json").read_text()) for source in ("logs", "stats")
    )
    logs_profile, stats_profile = from_logs.pop("profile"), from_stats.pop("profile")
    assert from_logs == from_stats
    np.testing.assert_allclose(logs_profile["per_layer"], stats_profile["per_layer"], rtol=1e-3)

    report_dir = tmp_path / "report"
    assert (
        cli.main(
            [
                "analyze",
                "--config",
                f"configs/analyze.py:a={tmp_path / 'a'},b={tmp_path / 'b'}",
                f"--config.out_dir={report_dir}",
            ]
        )
        == 0
    )
    report = (report_dir / "routing.md").read_text()
    assert "| a / b |" in report and report.count("\n| 1 |") == 1
    assert (report_dir / "heatmap_a.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_errors_are_reported(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"messages": 3}\n')
    assert (
        cli.main(
            [
                "profile",
                "--config",
                "configs/profile.py",
                "--config.checkpoint=random",
                "--config.seq_len=64",
                f"--config.data={bad}",
            ]
        )
        == 2
    )
    assert "bad.jsonl:2: 'messages' must be" in capsys.readouterr().err
    assert (
        cli.main(["select", "--config", "configs/select.py", f"--config.stats={tmp_path / 'none'}"])
        == 2
    )
    assert "--config.stats=" in capsys.readouterr().err


def test_eval_writes_scores_and_predictions(tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"User: say {w}\n\nAssistant:", "answers": [f" {w}"]}) + "\n"
            for w in ("yes", "no", "maybe")
        )
    )
    held_out = _dataset(tmp_path / "held_out.jsonl", n=6)
    assert (
        cli.main(
            [
                "eval",
                "--config",
                "configs/eval.py",
                "--config.checkpoint=random",
                f"--config.tasks.intent.data={data}",
                "--config.tasks.intent.scorer=rouge_l",
                "--config.tasks.intent.max_new_tokens=4",
                f"--config.perplexity.data={held_out}",
                "--config.perplexity.seq_len=64",
                f"--config.out_dir={tmp_path / 'out'}",
            ]
        )
        == 0
    )
    scores = json.loads((tmp_path / "out/scores.json").read_text())
    assert set(scores) == {"intent", "perplexity"} and 0 <= scores["intent"] <= 1
    assert 50 < scores["perplexity"] < 1000  # a random byte-level model: about the vocabulary size
    records = [json.loads(ln) for ln in (tmp_path / "out/intent.jsonl").read_text().splitlines()]
    assert [r["answers"] for r in records] == [[" yes"], [" no"], [" maybe"]]
    data.write_text('{"prompt": "x", "answers": "not a list"}\n')
    assert (
        cli.main(
            [
                "eval",
                "--config",
                "configs/eval.py",
                "--config.checkpoint=random",
                f"--config.tasks.intent.data={data}",
            ]
        )
        == 2
    )
    assert "eval.jsonl:1: expected" in capsys.readouterr().err


def test_ctrl_c_outside_training_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C while `esft data` writes (the KeyboardInterrupt it raises there): no traceback."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_command.builtin_suite, "write_suite", interrupted)
    assert (
        cli.main(["data", "--config", "configs/data.py", f"--config.out={tmp_path / 'd'}"]) == 130
    )
    assert capsys.readouterr().err == "esft data: interrupted\n"

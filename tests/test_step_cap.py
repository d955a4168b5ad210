"""ESFT_MAX_STEPS (esft_jax/app/step_cap.py): only shrinks, says what it cut, refuses a bad value."""

import pytest

from esft_jax.app import cli, config_files, step_cap


def test_cap_shrinks_only_the_loops_and_never_grows_a_setting():
    c = config_files.load("configs/train.py:esft", ["steps=3", "data.max_validation=0"])
    cut = step_cap.apply("train", c, 5)
    assert (c.steps, c.data.max_validation) == (3, 5 * c.batch_size)  # 3 < 5 stays; 0 ("all") cut
    assert cut == [f"data.max_validation 0 -> {5 * c.batch_size}"]
    c = config_files.load("configs/eval.py", ["batch_size=4", "tasks.intent.limit=3"])
    step_cap.apply("eval", c, 2)
    assert c.tasks.intent.limit == 3 and c.tasks.law.limit == 8 and c.perplexity.limit == 8
    c = config_files.load("configs/profile.py", ["seq_len=128", "batch_size=4"])
    assert step_cap.apply("profile", c, 2) == ["token_budget 131072 -> 1024"]
    c = config_files.load("configs/experiments/main.py", [])
    step_cap.apply("run", c, 1)
    assert all(s.profile.token_budget == s.profile.batch_size * 256 for s in c.studies.values())
    assert step_cap.apply("select", config_files.load("configs/select.py:token", []), 1) == []


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_value_is_one_line_and_exit_2(value, monkeypatch, capsys):
    monkeypatch.setenv(step_cap.ENV, value)
    argv = ["profile", "--config", "configs/profile.py", "--config.data=README.md"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"esft profile: error: ESFT_MAX_STEPS={value!r}: expected a whole number >= 1 (or unset)\n"
    )

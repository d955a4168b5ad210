"""Study tables: one task, and several tasks side by side."""

from esft_jax.report import Study, aggregate_table, study_table


def _study(task, scores, general, fft_params=1000, esft_params=50):
    results = {m: {task: scores[m], "g1": general[m][0], "g2": general[m][1]} for m in scores}
    summary = dict(optimizer_state_bytes=8e6, adapter_bytes=4e6, train_seconds=12.0)
    summaries = {
        "fft": {**summary, "trainable_params": fft_params},
        "esft": {**summary, "trainable_params": esft_params},
    }
    return Study(task, ("g1", "g2"), results, summaries)


def _rows(table):
    return {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in table.splitlines()[2:]
    }


def test_aggregate_table_averages_over_tasks():
    a = _study(
        "a",
        {"vanilla": 0.1, "fft": 0.9, "esft": 0.8},
        {"vanilla": (1, 1), "fft": (0.5, 0.7), "esft": (1, 0.8)},
    )
    b = _study(
        "b",
        {"vanilla": 0.0, "fft": 0.6, "esft": 0.7},
        {"vanilla": (1, 0.5), "fft": (0.2, 0.4), "esft": (0.9, 0.9)},
        fft_params=2000,
        esft_params=200,
    )
    table = aggregate_table({"a": a, "b": b})
    assert (
        table.splitlines()[0] == "| method | a | b | task avg | general avg | trainable (of FFT) |"
    )
    rows = _rows(table)
    assert list(rows) == ["vanilla", "fft", "esft"]
    assert rows["fft"] == [
        "0.900",
        "0.600",
        "0.750",
        "0.450",
        "100.0%",
    ]  # general: mean of 0.6 and 0.3
    assert rows["esft"] == [
        "0.800",
        "0.700",
        "0.750",
        "0.900",
        "7.5%",
    ]  # params: mean of 5% and 10%
    assert rows["vanilla"] == ["0.100", "0.000", "0.050", "0.875", "-"]


def test_aggregate_table_leaves_missing_methods_blank():
    a = _study(
        "a",
        {"vanilla": 0.1, "fft": 0.9, "esft": 0.8},
        {"vanilla": (1, 1), "fft": (0.5, 0.7), "esft": (1, 0.8)},
    )
    b = _study("b", {"vanilla": 0.0, "fft": 0.6}, {"vanilla": (1, 0.5), "fft": (0.2, 0.4)})
    assert _rows(aggregate_table({"a": a, "b": b}))["esft"] == [
        "0.800",
        "",
        "0.800",
        "0.900",
        "5.0%",
    ]


def test_study_table_perplexity_column_only_when_measured():
    s = _study(
        "a",
        {"vanilla": 0.1, "fft": 0.9, "esft": 0.8},
        {"vanilla": (1, 1), "fft": (0.5, 0.7), "esft": (1, 0.8)},
    )
    assert "held-out ppl" not in study_table(s)
    for r in s.results.values():
        r["perplexity"] = 12.5
    table = study_table(s)
    assert "held-out ppl" in table and _rows(table)["esft"][:5] == [
        "0.800",
        "1.000",
        "0.800",
        "0.900",
        "12.50",
    ]
    assert _rows(table)["esft"][5] == "50 (5.0%)" and _rows(table)["vanilla"][5] == "-"


def test_study_table_step_time_and_general_retained():
    s = _study(
        "a",
        {"vanilla": 0.1, "fft": 0.9, "esft": 0.8},
        {"vanilla": (0.8, 0.6), "fft": (0.2, 0.5), "esft": (0.7, 0.63)},
    )
    s.summaries["esft"]["step_seconds"] = 0.0421
    rows = _rows(study_table(s))
    # retained: general avg over vanilla's (0.7): fft 0.35 / 0.7, esft 0.665 / 0.7
    assert [rows[m][-1] for m in ("vanilla", "fft", "esft")] == ["100.0%", "50.0%", "95.0%"]
    assert rows["esft"][-3] == "0.042" and rows["fft"][-3] == "-"


def test_step_seconds_leave_out_the_first_interval_which_compiles():
    from esft_jax.app.commands.train import _step_seconds

    history = [
        {"step": 20, "seconds": 30.0},  # compiles
        {"step": 40, "seconds": 2.0},
        {"step": 60, "seconds": 9.0},  # a validation pass inside
        {"step": 70, "seconds": 1.2},  # a last, shorter interval
    ]
    assert _step_seconds(history) == 0.12  # median of 0.1, 0.45, 0.12
    assert _step_seconds(history[:1]) is None

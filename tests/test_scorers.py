"""Scorers: the official intent metric reproduced sample by sample; the text metrics on known cases."""

import json

import pytest

from esft_jax.eval import scorers


@pytest.mark.parametrize("method, mean", [("gate", 0.800), ("token", 0.760)])
def test_intent_reproduces_the_official_scores(reference, method, mean):
    rows = [
        json.loads(ln) for ln in (reference / f"results/completions/{method}/intent.jsonl").open()
    ]
    ours = [
        scorers.intent(r["example"]["raw_prediction"], r["example"]["raw_answers"]) for r in rows
    ]
    assert ours == [float(r["score"]) for r in rows]  # every one of the 500 samples
    assert sum(ours) / len(ours) == pytest.approx(mean)


def test_intent_rules():
    ref = ['{"intent": "Alarm-Update", "slots": {"date": ["1号", "6号"], "time": "9点"}}']
    assert (
        scorers.intent(
            ' {"intent": "Alarm-Update", "slots": {"time": "9点", "date": ["6号", "1号"]}}。', ref
        )
        == 1
    )
    assert (
        scorers.intent('{"intent": "Alarm-Update", "slots": {"date": ["1号"], "time": "9点"}}', ref)
        == 0
    )
    assert (
        scorers.intent(
            '{"intent": "Alarm-Query", "slots": {"date": ["1号", "6号"], "time": "9点"}}', ref
        )
        == 0
    )
    assert scorers.intent("not json", ref) == 0
    assert (
        scorers.intent(
            '{"intent": "Alarm-Update", "slots": {"date": ["1号", "6号"], "time": "9点"}}\nmore',
            ref,
        )
        == 1
    )


def test_text_metrics():
    assert (
        scorers.exact_match(" yes ", ["no", "yes"]) == 1
        and scorers.exact_match("yes.", ["yes"]) == 0
    )
    assert scorers.rouge_l("the cat sat", ["the cat sat"]) == 1.0
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4
    assert scorers.rouge_l("a b c d", ["a c d e"]) == pytest.approx(0.75)
    assert scorers.rouge_l("我爱北京", ["我在北京"]) == pytest.approx(0.75)  # characters for CJK
    assert scorers.rouge_l("x", ["y"]) == 0.0
    assert scorers.chrf("hello world", ["hello world"]) == pytest.approx(1.0)
    assert 0 < scorers.chrf("hello word", ["hello world"]) < 1
    assert scorers.bleu("the cat is on the mat", ["the cat is on the mat"]) == pytest.approx(1.0)

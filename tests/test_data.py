"""Dataset and eval-set lines, tokenisation, the byte tokenizer, and malformed routing logs."""

import dataclasses
import json
import re

import numpy as np
import pytest

from esft_jax.app import config_files
from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.data.records import DataError, Sample
from esft_jax.data.sources import read_samples
from esft_jax.data.tokenize import encode
from esft_jax.eval.metrics import EvalSample, read_eval_set
from esft_jax.routing.official_logs import read_official_logs
from esft_jax.routing.sources import load_stats

CFG = config_files.model_config(config_files.load_file("configs/models/tiny.py"))


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_messages_completion_and_text_lines(tmp_path):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": None},
    ]
    lines = [
        json.dumps({"messages": turns, "tools": [{"type": "function"}]}),
        "",
        json.dumps({"text": "plain"}),
        json.dumps({"prompt": "p", "completion": "c"}),
    ]
    samples, skipped = read_samples(_write(tmp_path / "d.jsonl", lines))
    path = tmp_path / "d.jsonl"
    assert skipped == 0
    assert samples[0] == Sample("", "", f"{path}:1", tuple(turns), ({"type": "function"},))
    assert samples[1] == Sample("", "plain", f"{path}:3")
    assert samples[2] == Sample("p", "c", f"{path}:4")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [{"role": "user", "content": "a"}]', "not valid JSON"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant message"),
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": [{"content": "a"}]}', r"messages\[0\]: expected an object with a 'role'"),
        (
            '{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "b"}]}',
            r"messages\[0\]: 'content' must be a string",
        ),
        ('{"messages": [{"role": "assistant", "content": "a"}], "tools": 3}', "'tools' must be"),
        ('{"prompt": "x", "completion": 1}', "'prompt' and 'completion' must be strings"),
        ('{"prompt": "x"}', "expected a 'messages' list, 'prompt' and 'completion'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"text": "ok"})
    path = _write(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(DataError, match=rf"bad.jsonl:3: .*{message}"):
        read_samples(path)
    samples, skipped = read_samples(path, skip_invalid=True)
    assert (len(samples), skipped) == (2, 1)


def test_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="no such dataset file"):
        read_samples(tmp_path / "none.jsonl")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x", "answers": ["a"]', "not valid JSON"),
        ('{"prompt": "x", "answers": []}', 'expected {"prompt"'),
        ('["x"]', 'expected {"prompt"'),
    ],
)
def test_eval_sets_read_up_to_the_limit_and_name_bad_lines(tmp_path, line, message):
    good = [json.dumps({"prompt": f"p{i}", "answers": [f"a{i}"]}) for i in range(3)]
    path = _write(tmp_path / "eval.jsonl", [good[0], "", *good[1:], line])
    assert read_eval_set(path, limit=2) == [
        EvalSample("p0", ["a0"], f"{path}:1"),
        EvalSample("p1", ["a1"], f"{path}:3"),
    ]
    with pytest.raises(DataError, match=rf"eval.jsonl:5: {re.escape(message)}"):
        read_eval_set(path)
    with pytest.raises(DataError, match="no such eval file"):
        read_eval_set(tmp_path / "none.jsonl")


def test_encode_marks_the_answer_exactly():
    tok = byte_tokenizer()
    cfg = dataclasses.replace(CFG, bos_token_id=256, eos_token_id=257)
    [(ids, answer)] = encode(tok, Sample("User: é\n\nAssistant:", " ok", "t"), cfg)
    prompt_bytes = list("User: é\n\nAssistant:".encode())
    assert ids.tolist() == [256, *prompt_bytes, *b" ok", 257]
    assert answer.tolist() == [False] * (1 + len(prompt_bytes)) + [True] * 4
    assert tok.decode(ids[1:-1].tolist()) == "User: é\n\nAssistant: ok"


def test_official_format_on_the_real_data(reference):
    samples, skipped = read_samples(reference / "datasets/train/law.jsonl")
    assert skipped == 0 and len(samples) == 927
    assert [m["role"] for m in samples[0].messages] == ["user", "assistant"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("1\t2\t3", "expected expert ids, an empty field, then gate weights"),
        ("1\t2\t3\t\t0.1\t0.2", "3 expert ids but 2 gate weights"),
        ("1\t2\t\t0.1\t0.2", "2 expert ids is not a multiple of top_k=3"),
        ("1\t2\t99\t\t0.1\t0.2\t0.3", r"expert id 99 out of range \[0, 16\)"),
        ("1\t2\t2\t\t0.1\t0.2\t0.3", "an expert appears twice"),
        ("1\tx\t2\t\t0.1\t0.2\t0.3", "invalid literal"),
    ],
)
def test_malformed_logs_name_file_and_line(tmp_path, line, message):
    _write(tmp_path / "expert_weights_1.txt", ["1\t2\t3\t\t0.1\t0.2\t0.3", line])
    with pytest.raises(DataError, match=rf"expert_weights_1.txt:2: {message}"):
        read_official_logs(tmp_path, top_k=3, num_experts=16)


def test_logs_must_agree_across_layers(tmp_path):
    _write(tmp_path / "expert_weights_1.txt", ["1\t2\t3\t\t0.1\t0.2\t0.3"] * 2)
    _write(tmp_path / "expert_weights_2.txt", ["1\t2\t3\t\t0.1\t0.2\t0.3"])
    with pytest.raises(
        DataError, match="expert_weights_2.txt: 1 sequences, but expert_weights_1.txt has 2"
    ):
        read_official_logs(tmp_path, top_k=3, num_experts=16)
    _write(
        tmp_path / "expert_weights_2.txt",
        ["1\t2\t3\t\t0.1\t0.2\t0.3", "1\t2\t3\t4\t5\t6\t\t" + "\t".join(["0.1"] * 6)],
    )
    with pytest.raises(
        DataError, match="expert_weights_2.txt:2: 2 tokens, but expert_weights_1.txt has 1"
    ):
        read_official_logs(tmp_path, top_k=3, num_experts=16)
    with pytest.raises(DataError, match="no such stats file or log directory"):
        load_stats(tmp_path / "nothing")
    (tmp_path / "bad.npz").write_bytes(b"not npz")
    with pytest.raises(DataError, match="bad.npz: not a routing stats file"):
        load_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "empty.npz", x=np.zeros(1))
    with pytest.raises(DataError, match="empty.npz: not a routing stats file"):
        load_stats(tmp_path / "empty.npz")

"""The built-in task suite and pretrained model."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from esft_jax.builtin import suite as builtin_suite
from esft_jax.data.sources import read_samples
from esft_jax.eval import scorers
from esft_jax.eval.metrics import read_eval_set

MODEL = Path(builtin_suite.__file__).parent / "tiny_moe"


def test_suite_is_deterministic_and_well_formed(tmp_path):
    a, b = (
        builtin_suite.write_suite(tmp_path / "a", 50, 10),
        builtin_suite.write_suite(tmp_path / "b", 50, 10),
    )
    files = sorted(p.relative_to(a) for p in a.rglob("*.jsonl"))
    assert [str(f) for f in files] == [
        "eval/count.jsonl",
        "eval/docs.jsonl",
        "eval/facts.jsonl",
        "eval/intent.jsonl",
        "eval/math.jsonl",
        "eval/sort.jsonl",
        "train/count.jsonl",
        "train/facts.jsonl",
        "train/intent.jsonl",
        "train/math.jsonl",
        "train/sort.jsonl",
    ]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    for name in ("intent", "math", "sort", "facts", "count"):
        train, _ = read_samples(a / "train" / f"{name}.jsonl")
        evals = read_eval_set(a / "eval" / f"{name}.jsonl")
        assert len(train) == 50 and len(evals) == 10
        asked = {f"User: {s.messages[0]['content']}\n\nAssistant:" for s in train}
        assert not asked >= {e.prompt for e in evals}  # held-out prompts
    intent = read_eval_set(a / "eval" / "intent.jsonl")
    # answers are valid intent JSON
    assert all(scorers.intent(e.answers[0], e.answers) == 1.0 for e in intent)
    assert json.loads(intent[0].answers[0])["intent"] in builtin_suite.ACTIONS.values()


def test_general_formats_are_pretrained_downstream_formats_are_not():
    corpus = [r["text"] for r in builtin_suite.pretraining_corpus(300, seed=0)]
    text = "\n".join(corpus)
    assert "User: Q: What is the" in text and "User: Count the words:" in text
    assert "Parse into JSON" not in text
    assert not re.search(r"Compute \d+ \+ \d+", text) and not re.search(
        r"Sort: [a-z]+ [a-z]+", text
    )
    held_out = builtin_suite.python_docs()[-builtin_suite.HELD_OUT_DOCS :]
    assert not set(held_out) & set(corpus)
    assert {r["domain"] for r in builtin_suite.pretraining_corpus(1, 0)} == {
        "home",
        "math",
        "words",
        "facts",
        "count",
        "docs",
    }


@pytest.mark.skipif(
    not (MODEL / "config.json").is_file(), reason="the built-in model is not in this checkout"
)
def test_builtin_model_loads_in_esft_jax_and_transformers():
    transformers = pytest.importorskip("transformers")
    import jax
    import torch

    from esft_jax.checkpoint import load_checkpoint, load_tokenizer
    from esft_jax.model import forward

    size = sum(p.stat().st_size for p in MODEL.iterdir())
    assert size <= 25e6
    cfg, params = load_checkpoint(MODEL)
    assert (
        cfg.first_k_dense_replace >= 1 and cfg.num_hidden_layers >= 4 and cfg.n_routed_experts >= 32
    )
    assert cfg.num_experts_per_tok >= 4 and cfg.n_shared_experts in (1, 2)
    ids = (
        load_tokenizer(MODEL)
        .encode("User: Q: What is the capital of Gosgosland? A:", add_special_tokens=False)
        .ids
    )
    tokens = np.asarray([[cfg.bos_token_id, *ids]])
    ours, _ = jax.jit(forward, static_argnums=2)(params, tokens, cfg)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        MODEL, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4 * np.abs(ref).max()

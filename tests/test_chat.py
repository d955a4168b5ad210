"""Chat templates (esft_jax/data/chat.py, data/tokenize.py) against transformers' apply_chat_template.

Each family's published template (tests/chat_templates/, gpt-oss's abridged) sits in a tiny tokenizer
directory: a byte-level BPE trained here on ASCII text (merges that cross what the templates join,
vocabulary under 256 so a tiny model can read it) with the template's special tokens added. Token ids
must equal transformers' apply_chat_template(tokenize=True) of the same conversation; trained-token
masks equal transformers' return_assistant_tokens_mask on a `{% generation %}` variant of the
template, or the spans transformers' own prefix renders give (the brief's float-free reference).
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from esft_jax.app import config_files
from esft_jax.checkpoint import load_tokenizer
from esft_jax.data import chat
from esft_jax.data.records import DataError, Sample
from esft_jax.data.tokenize import TemplateError, chat_template, encode, prompt_ids

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "chat_templates"
CFG = config_files.model_config(config_files.load_file("configs/models/tiny.py"))
# family -> (special tokens, tokenizer_config's named tokens, the model's EOS ids: config.json's)
FAMILIES = {
    "qwen3": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>"]
        + ["</tool_call>", "<tool_response>", "</tool_response>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        ["<|im_end|>"],
    ),
    "gpt_oss": (
        ["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>"]
        + ["<|return|>", "<|call|>"],
        {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"},
        ["<|return|>", "<|endoftext|>", "<|call|>"],
    ),
    "glm4_5": (
        ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"]
        + ["<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>"],
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        ["<|endoftext|>", "<|user|>", "<|observation|>"],
    ),
    "mixtral": (
        ["<unk>", "<s>", "</s>"],
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        ["</s>"],
    ),
    "deepseek_v3": (
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
        {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
        ["<｜end▁of▁sentence｜>"],
    ),
}
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3 ?\nThink."},
    {"role": "assistant", "content": "6, of course!"},
]
ASCII = "\n" + "".join(map(chr, range(32, 127)))


def _tokenizer(specials: list[str], corpus: list[str], ascii_only: bool = False) -> Tokenizer:
    """A byte-level BPE (specials first) trained on `corpus`: over every byte, or (ascii_only)
    over ASCII text alone in fewer than 256 ids, for a tiny model's vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    to_byte_chars = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted(to_byte_chars.pre_tokenize_str(ASCII)[0][0])
    alphabet = alphabet if ascii_only else pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=250 if ascii_only else 400,
        special_tokens=specials,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def _corpus(template: str) -> list[str]:
    texts = [m["content"] for m in CHAT] + [template] * 3
    return texts + ["Assistant: User: [INST] [/INST] function add\n\n{'a': 1}"] * 5


def write_family(
    family: str, out: Path, layout: str = "config", template: str = "", ascii_only: bool = False
) -> Path:
    """A tokenizer directory for `family`: tokenizer.json and tokenizer_config.json holding the
    template (layout "config": a string; "list": named default + tool_use; "jinja": beside it in
    chat_template.jinja)."""
    specials, named, _ = FAMILIES[family]
    template = template or (TEMPLATES / f"{family}.jinja").read_text()
    out.mkdir(parents=True, exist_ok=True)
    _tokenizer(specials, _corpus(template), ascii_only).save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **named}
    if layout == "config":
        config["chat_template"] = template
    elif layout == "list":
        tool_use = template.replace("# Tools", "# Tool use")
        config["chat_template"] = [
            {"name": "default", "template": template},
            {"name": "tool_use", "template": tool_use},
        ]
    else:
        (out / "chat_template.jinja").write_text(template)
        config["chat_template"] = "{{ raise_exception('the .jinja file wins') }}"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _ours(family: str, path: Path):
    """(esft's tokenizer, the model config with the family's EOS ids, the loaded template)."""
    tok = load_tokenizer(path)
    eos = [tok.token_to_id(t) for t in FAMILIES[family][2]]
    cfg = dataclasses.replace(CFG, bos_token_id=None, eos_token_id=eos[0], eos_token_ids=eos)
    return tok, cfg, chat_template(tok, cfg, "model", path)


def _hf_ids(hf, messages, **kw) -> list[int]:
    return list(hf.apply_chat_template(messages, tokenize=True, **kw)["input_ids"])


def _prefix_mask(hf, messages, ids, tools=None, last_only=False) -> list[bool]:
    """The reference mask: transformers' renders of each assistant turn's prefix and of the turn
    give its characters (the last turn's only, with last_only); transformers' offsets give the
    tokens overlapping them."""
    text = hf.apply_chat_template(messages, tokenize=False, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and (i == len(messages) - 1 or not last_only):
            head = hf.apply_chat_template(
                messages[:i], tokenize=False, add_generation_prompt=True, tools=tools
            )
            upto = hf.apply_chat_template(messages[: i + 1], tokenize=False, tools=tools)
            spans.append((len(head), len(upto)))
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == ids
    return [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "glm4_5"])
def test_prefix_stable_templates_give_transformers_tokens_and_assistant_masks(family, tmp_path):
    path = write_family(family, tmp_path / family)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok, cfg, template = _ours(family, path)
    assert not template.by_turn and template.name.endswith("tokenizer_config.json")
    [(ids, trained)] = encode(tok, Sample("", "", "t", tuple(CHAT)), cfg, template)
    want = _hf_ids(hf, CHAT)
    mask = _prefix_mask(hf, CHAT, want)
    if family == "glm4_5":  # no end-of-turn token: the next <|user|> and an appended EOS train
        after_first = next(i for i in range(1, len(mask)) if mask[i - 1] and not mask[i])
        assert want[after_first] == tok.token_to_id("<|user|>")
        mask[after_first] = True
        want, mask = want + [cfg.eos_token_id], mask + [True]
    assert ids.tolist() == want
    assert trained.tolist() == mask and sum(mask) > 4
    prompt = prompt_ids(tok, template, CHAT[:4])
    assert prompt == _hf_ids(hf, CHAT[:4], add_generation_prompt=True)


def _mixtral_generation_variant() -> str:
    """Mixtral's template with `{% generation %}` around what the assistant writes."""
    old = "{{- ' ' + message['content'] + eos_token}}"
    text = (TEMPLATES / "mixtral.jinja").read_text()
    return text.replace(old, "{% generation %}" + old + "{% endgeneration %}")


def test_masks_equal_transformers_generation_masks_and_qwen3_turns_split(tmp_path):
    """Mixtral (prefix-stable): one document, its mask transformers' assistant mask. Qwen3 drops
    earlier turns' thinking, so each assistant turn is its own document: the template's rendering
    of the conversation up to it, only that turn (from <think> to <|im_end|>\\n) trained."""
    path = write_family("mixtral", tmp_path / "mixtral", template=_mixtral_generation_variant())
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok, cfg, template = _ours("mixtral", path)
    [(ids, trained)] = encode(tok, Sample("", "", "t", tuple(CHAT)), cfg, template)
    ref = hf.apply_chat_template(CHAT, return_assistant_tokens_mask=True, return_dict=True)
    assert ids.tolist() == list(ref["input_ids"])
    assert trained.tolist() == [bool(m) for m in ref["assistant_masks"]]

    chat_ = CHAT[:2] + [{**CHAT[2], "reasoning_content": "Add them."}] + CHAT[3:]
    path = write_family("qwen3", tmp_path / "qwen3", layout="jinja")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok, cfg, template = _ours("qwen3", path)
    assert template.name.endswith("chat_template.jinja")
    docs = encode(tok, Sample("", "", "t", tuple(chat_)), cfg, template)
    assert len(docs) == 2
    for (ids, trained), upto in zip(docs, (3, 5)):
        want = _hf_ids(hf, chat_[:upto])
        assert ids.tolist() == want
        text = hf.decode(np.asarray(want)[trained].tolist(), skip_special_tokens=False)
        content = chat_[upto - 1]["content"]
        assert text.startswith("<think>\n") and text.endswith(f"{content}<|im_end|>\n")
    assert "Add them." in hf.decode(docs[0][0].tolist()) and "Add them." not in hf.decode(
        docs[1][0].tolist()
    )
    last = encode(tok, Sample("", "", "t", tuple(chat_)), cfg, template, "last_assistant")
    assert len(last) == 1 and last[0][0].tolist() == docs[1][0].tolist()
    assert last[0][1].tolist() == docs[1][1].tolist()


def test_gpt_oss_harmony_thinking_and_date(tmp_path):
    """gpt-oss: the date from strftime_now, reasoning under `thinking` (aliased as transformers
    does), the last turn ending <|return|>, earlier ones <|end|>: one document per turn."""
    path = write_family("gpt_oss", tmp_path / "gpt_oss")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok, cfg, template = _ours("gpt_oss", path)
    chat_ = CHAT[:4] + [{**CHAT[4], "reasoning_content": "3+3 is 6."}]
    docs = encode(tok, Sample("", "", "t", tuple(chat_)), cfg, template)
    assert [ids.tolist() for ids, _ in docs] == [_hf_ids(hf, chat_[:3]), _hf_ids(hf, chat_)]
    ids, trained = docs[1]
    text = hf.decode(ids[trained].tolist(), skip_special_tokens=False)
    assert text == (
        "<|channel|>analysis<|message|>3+3 is 6.<|end|><|start|>assistant<|channel|>final"
        "<|message|>6, of course!<|return|>"
    )
    assert prompt_ids(tok, template, chat_[:4]) == _hf_ids(
        hf, chat_[:4], add_generation_prompt=True
    )


def test_tools_tojson_and_named_templates(tmp_path):
    """Tools and tool calls through Qwen3's template (transformers' tojson: no HTML escaping,
    non-ASCII kept); a list of named templates renders "tool_use" when tools are given."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Adds <a> & b — naïvely",
                "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
            },
        }
    ]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}
    chat_ = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4."},
    ]
    path = write_family("qwen3", tmp_path / "qwen3", layout="list")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok, cfg, template = _ours("qwen3", path)
    assert template.tool_use is not None
    sample = Sample("", "", "t", tuple(chat_), tuple(tools))
    # the tool call gets an empty <think> block while it is the last message: a document each
    first, (ids, trained) = encode(tok, sample, cfg, template)
    assert first[0].tolist() == _hf_ids(hf, chat_[:2], tools=tools)
    want = _hf_ids(hf, chat_, tools=tools)
    assert ids.tolist() == want and "# Tool use" in tok.decode(want)
    assert trained.tolist() == _prefix_mask(hf, chat_, want, tools, last_only=True)
    assert prompt_ids(tok, template, chat_[:1]) == _hf_ids(
        hf, chat_[:1], add_generation_prompt=True
    )


def test_esft_format_is_encoded_turn_by_turn_as_the_official_code(tmp_path):
    """ESFT's format, chosen or carried as a checkpoint's template (esft export writes it): BOS +
    each user turn's "User: ...\\n\\nAssistant:" and each answer's " ..." + EOS encoded apart."""
    specials = ["<pad>", "<bos>", "<eos>"]
    path = tmp_path / "esft"
    path.mkdir()
    _tokenizer(specials, _corpus(chat.ESFT_TEMPLATE)).save(str(path / "tokenizer.json"))
    tok = load_tokenizer(path)
    cfg = dataclasses.replace(CFG, bos_token_id=1, eos_token_id=2)
    turns = CHAT[1:]
    pieces = [  # (ids, trained) of BOS, each user turn + "Assistant:", each answer + EOS
        (tok.encode(f"User: {m['content']}\n\nAssistant:").ids, False)
        if m["role"] == "user"
        else (tok.encode(f" {m['content']}").ids + [2], True)
        for m in turns
    ]
    want = [1] + [i for ids, _ in pieces for i in ids]
    mask = [False] + [answer for ids, answer in pieces for _ in ids]
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<bos>", "eos_token": "<eos>", "chat_template": chat.ESFT_TEMPLATE}
        )
    )
    for choice in ("esft", "model"):
        template = chat_template(tok, cfg, choice, path)
        assert template.by_turn
        [(ids, trained)] = encode(tok, Sample("", "", "t", tuple(turns)), cfg, template)
        assert (ids.tolist(), trained.tolist()) == (want, mask)
        assert prompt_ids(tok, template, turns[:3]) == want[: len(want) - len(pieces[3][0])]
    with pytest.raises(
        DataError, match="t: chat template .*: ESFT chats hold only user and assistant"
    ):
        encode(tok, Sample("", "", "t", tuple(CHAT)), cfg, template)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert hf.apply_chat_template(turns, tokenize=False) == tok.decode(
        want, skip_special_tokens=False
    )


def test_loss_on_and_plain_samples(tmp_path):
    path = write_family("deepseek_v3", tmp_path / "ds")
    tok, cfg, template = _ours("deepseek_v3", path)
    sample = Sample("", "", "t", tuple(CHAT))
    [(ids, every)] = encode(tok, sample, cfg, template, "assistant")
    [(last_ids, last)] = encode(tok, sample, cfg, template, "last_assistant")
    [(all_ids, everything)] = encode(tok, sample, cfg, template, "all")
    assert ids.tolist() == last_ids.tolist() == all_ids.tolist() and everything.all()
    assert last.sum() < every.sum() and (every | ~last).all()
    assert (
        tok.decode(ids[last].tolist(), skip_special_tokens=False)
        == "6, of course!<｜end▁of▁sentence｜>"
    )
    cfg = dataclasses.replace(cfg, bos_token_id=tok.token_to_id("<｜begin▁of▁sentence｜>"))
    [(ids, trained)] = encode(tok, Sample("Q: ", "A", "t"), cfg, template)
    assert ids.tolist() == [
        cfg.bos_token_id,
        *tok.encode("Q: ").ids,
        *tok.encode("A").ids,
        cfg.eos_token_id,
    ]
    assert trained.tolist() == [False] * (1 + len(tok.encode("Q: ").ids)) + [True] * (
        len(ids) - 1 - len(tok.encode("Q: ").ids)
    )
    assert encode(tok, Sample("Q: ", "A", "t"), cfg, template, "all")[0][1][1:].all()


def test_templates_that_cannot_mark_or_load_are_refused(tmp_path):
    path = write_family("mixtral", tmp_path / "m")
    tok, cfg, template = _ours("mixtral", path)
    with pytest.raises(DataError, match="t: chat template .*roles must alternate"):
        encode(tok, Sample("", "", "t", tuple(CHAT[1:2] * 2 + CHAT[2:3])), cfg, template)
    unstable = tmp_path / "unstable.jinja"
    unstable.write_text(
        "{% for m in messages %}<{{ m.role }}> {{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>\n{% endif %}"
    )
    template = chat_template(tok, cfg, str(unstable), path)
    with pytest.raises(DataError, match="does not follow the template's generation prompt"):
        encode(tok, Sample("", "", "t", tuple(CHAT)), cfg, template)
    assert encode(tok, Sample("", "", "t", tuple(CHAT)), cfg, template, "all")[0][1].all()
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% if %}")
    for choice, message in [
        (str(bad), "bad.jinja:1: not a Jinja template"),
        (str(tmp_path / "none.jinja"), "none.jinja: no such file"),
        ("chatml", "expected model or esft or a path ending in .jinja"),
    ]:
        with pytest.raises(TemplateError, match=rf"--config.template.*{message}"):
            chat_template(tok, cfg, choice, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "rag", "template": "x"}]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TemplateError, match="names its chat templates rag and none 'default'"):
        chat_template(tok, cfg, "model", path)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert chat_template(tok, cfg, "model", path).by_turn  # no template: ESFT's


def test_training_batches_and_eval_prompts_use_the_template(tmp_path):
    """The pipeline trains each document a sample makes (Qwen3: one per assistant turn); an eval
    set's {"messages", "answers"} rows are prompted with the generation prompt, as transformers."""
    from esft_jax.data.pipeline import eval_batches
    from esft_jax.eval.metrics import _prompt, read_eval_set

    path = write_family("qwen3", tmp_path / "qwen3")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok, cfg, template = _ours("qwen3", path)
    [batch] = eval_batches(
        [Sample("", "", "t", tuple(CHAT))], tok, cfg, seq_len=256, batch_size=1, template=template
    )
    docs = [batch["tokens"][0][batch["segment_ids"][0] == s].tolist() for s in (1, 2)]
    assert docs == [_hf_ids(hf, CHAT[:3]), _hf_ids(hf, CHAT)]
    rows = [{"messages": CHAT[:4], "answers": ["6"]}, {"prompt": "User: hi", "answers": ["x"]}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat_row, text_row = read_eval_set(tmp_path / "eval.jsonl")
    text, ids = _prompt(chat_row, tok, template)
    assert ids == _hf_ids(hf, CHAT[:4], add_generation_prompt=True)
    assert text == hf.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert _prompt(text_row, tok, template) == ("User: hi", "User: hi")


@pytest.mark.slow
def test_served_chat_equals_transformers_generate(tmp_path):
    """A greedy /v1/chat/completions request on a tiny Qwen3-MoE with Qwen3's template: the
    prompt transformers' apply_chat_template(add_generation_prompt=True) makes, and the text of
    transformers' generate from it."""
    import hf_models
    import httpx
    import test_serve_http as http_tests
    import torch

    from esft_jax.checkpoint import load_checkpoint
    from esft_jax.serve.engine import Engine
    from esft_jax.serve.http import Server
    from esft_jax.serve.monitor import Monitor
    from esft_jax.serve.worker import Worker

    path = tmp_path / "qwen3_moe"
    model = hf_models.build("qwen3_moe", path)
    write_family("qwen3", path, ascii_only=True)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    cfg, params = load_checkpoint(path)
    tok = load_tokenizer(path)
    assert tok.get_vocab_size() <= cfg.vocab_size and cfg.eos_token_id == tok.token_to_id(
        "<|im_end|>"
    )
    engine = Engine(cfg, params, {}, rows=2, max_len=128)
    monitor = Monitor(engine.bank, ood_ratio=0.5, base_name="base", layers=cfg.moe_layer_ids)
    template = chat_template(tok, cfg, "model", path)
    server = Server(Worker(engine), tok, monitor, base_name="base", template=template)
    uv, thread, url = http_tests._start(server)
    try:
        body = {"model": "base", "messages": CHAT[:4], "max_tokens": 8, "temperature": 0}
        got = httpx.post(f"{url}/chat/completions", json=body, timeout=120).json()
        bad = httpx.post(f"{url}/chat/completions", json={**body, "messages": [{"role": "user"}]})
    finally:
        http_tests._stop(uv, thread, server)
    ids = _hf_ids(hf, CHAT[:4], add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=cfg.eos_token_id
        )
    assert server.request(body, chat=True).prompt == ids  # what the engine is given
    assert got["usage"]["prompt_tokens"] == len(ids)
    assert got["choices"][0]["message"]["content"] == tok.decode(out[0, len(ids) :].tolist())
    assert bad.status_code == 400
    assert (
        bad.json()["error"]["message"]
        == "messages[0]: 'content' must be a string (or a list of parts)"
    )

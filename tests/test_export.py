"""`esft export` destroys nothing, and what it writes generates in transformers exactly as `esft eval`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import train_fixtures as fx

from esft_jax.app import cli
from esft_jax.builtin import suite as builtin_suite
from esft_jax.checkpoint import load_checkpoint, load_tokenizer
from esft_jax.checkpoint.output_dir import MARKER
from esft_jax.data.records import Sample
from esft_jax.data.tokenize import encode
from esft_jax.eval.generate import generate, generate_text
from esft_jax.eval.metrics import read_eval_set

BUILTIN = Path(builtin_suite.__file__).parent / "tiny_moe"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(base checkpoint, adapter) of the tiny random model; tests must leave them byte-identical."""
    root = tmp_path_factory.mktemp("inputs")
    base = fx.base_checkpoint(root / "base")
    return base, fx.fake_esft_adapter(base, root / "adapter")


def export(capsys, base: Path, adapter: Path, out: Path, *extra: str) -> tuple[int, str]:
    """(exit code, stderr) of `esft export`."""
    capsys.readouterr()
    code = cli.main(
        [
            "export",
            "--config",
            "configs/export.py",
            f"--config.checkpoint={base}",
            f"--config.adapter={adapter}",
            f"--config.out={out}",
            *extra,
        ]
    )
    return code, capsys.readouterr().err


def snapshot(*dirs: Path) -> dict[Path, bytes]:
    return {
        p: p.read_bytes() for d in dirs if d.exists() for p in sorted(d.rglob("*")) if p.is_file()
    }


def assert_refused(capsys, inputs, out: Path, *extra: str, says: str) -> None:
    before = snapshot(*inputs, out)
    code, err = export(capsys, *inputs, out, *extra)
    assert code == 2
    assert (
        err.count("\n") == 1
        and err.startswith("esft export: error: --config.out: ")
        and says in err
    ), err
    assert snapshot(*inputs, out) == before  # inputs and whatever was in out: byte-identical


def test_refuses_a_directory_it_did_not_write(capsys, inputs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    assert_refused(capsys, inputs, out, says=f"{out}: not empty and not an esft export")
    assert_refused(capsys, inputs, out, "--config.overwrite=True", says="not an esft export")
    assert (out / "notes.txt").read_text() == "the user's"


@pytest.mark.parametrize(
    "where, says",
    [
        ("checkpoint", "is the input"),
        ("inside_adapter", "lies inside the input"),
        ("above_checkpoint", "contains the input"),
    ],
)
def test_refuses_to_write_over_or_around_an_input(capsys, inputs, where, says):
    base, adapter = inputs
    out = {
        "checkpoint": base,
        "inside_adapter": adapter / "merged",
        "above_checkpoint": base.parent,
    }[where]
    assert_refused(capsys, inputs, out, "--config.overwrite=True", says=f"{out}: {says}")
    assert not (adapter / "merged").exists()


def test_overwrite_replaces_only_a_previous_export(capsys, inputs, tmp_path):
    out = tmp_path / "export"
    before = snapshot(*inputs)
    assert export(capsys, *inputs, out) == (0, "")
    exported = snapshot(out)
    marker = json.loads((out / MARKER).read_text())
    assert sorted([*marker["files"], MARKER]) == sorted(p.name for p in out.iterdir())
    assert_refused(capsys, inputs, out, says="holds a previous export; set --config.overwrite=True")

    (out / "model.safetensors").write_bytes(b"damaged")  # a file of its own: replaced
    assert export(capsys, *inputs, out, "--config.overwrite=True") == (0, "")
    assert snapshot(out) == exported
    assert snapshot(*inputs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging directory left

    # a file the user added: kept, so the export is refused
    (out / "README.md").write_text("the user's")
    assert_refused(capsys, inputs, out, "--config.overwrite=True", says="did not write (README.md)")


def test_export_writes_the_tokenizer_files_transformers_needs(capsys, inputs, tmp_path):
    """From esft's own tokenizer (only a tokenizer.json): BOS prepended, chat template = training format."""
    transformers = pytest.importorskip("transformers")
    assert export(capsys, *inputs, tmp_path / "export") == (0, "")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    cfg, _ = load_checkpoint(tmp_path / "export")
    ours = load_tokenizer(tmp_path / "export")
    text = "Hello, wörld"
    assert hf(text).input_ids == [
        cfg.bos_token_id,
        *ours.encode(text, add_special_tokens=False).ids,
    ]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        cfg.bos_token_id,
        cfg.eos_token_id,
        cfg.pad_token_id,
    )
    user, assistant = "turn on the fan", '{"intent": "Device-On"}'
    chat = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    prompt, answer = f"User: {user}\n\nAssistant:", f" {assistant}"  # ESFT's training format
    assert (
        hf.apply_chat_template(chat, tokenize=False)
        == hf.bos_token + prompt + answer + hf.eos_token
    )
    assert (
        hf.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
        == hf.bos_token + prompt
    )
    [(ids, _)] = encode(ours, Sample("", "", "test", tuple(chat)), cfg)
    # the training tokens
    assert list(hf.apply_chat_template(chat, tokenize=True)["input_ids"]) == ids.tolist()


@pytest.mark.slow
def test_transformers_generates_what_esft_eval_generates(capsys, tmp_path):
    """The built-in model + an adapter, exported: transformers' greedy `generate` gives esft eval's tokens."""
    transformers = pytest.importorskip("transformers")
    import torch

    base = tmp_path / "tiny_moe"
    shutil.copytree(BUILTIN, base)
    adapter = fx.fake_esft_adapter(base, tmp_path / "adapter")
    assert export(capsys, base, adapter, tmp_path / "export") == (0, "")
    suite = builtin_suite.write_suite(tmp_path / "suite", n_train=1, n_eval=2)
    evals = {name: read_eval_set(suite / "eval" / f"{name}.jsonl") for name in ("intent", "facts")}
    prompts = [
        s.prompt for s in evals["intent"][:1] + evals["facts"]
    ]  # runs to max_new; stop at EOS
    max_new = 16

    cfg, params = load_checkpoint(tmp_path / "export")
    esft_tokenizer = load_tokenizer(tmp_path / "export")
    texts = generate_text(params, cfg, esft_tokenizer, prompts, max_new_tokens=max_new)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    assert prompt_ids == [
        [cfg.bos_token_id, *esft_tokenizer.encode(p, add_special_tokens=False).ids] for p in prompts
    ]
    # generate_text's call
    ours = generate(params, cfg, prompt_ids, max_new_tokens=max_new, eos_id=cfg.eos_token_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", attn_implementation="eager"
    ).eval()
    threads = torch.get_num_threads()
    # the tiny model decodes ~10x faster on one thread than on two contended cores
    torch.set_num_threads(1)
    try:
        for ids, ours_ids, text in zip(prompt_ids, ours, texts):
            with torch.no_grad():
                new = model.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    do_sample=False,
                    max_new_tokens=max_new,
                )[0, len(ids) :].tolist()
            # stops at EOS, as esft does
            assert new == ours_ids + [cfg.eos_token_id] * (len(ours_ids) < max_new)
            assert tokenizer.decode(new, skip_special_tokens=True) == text
    finally:
        torch.set_num_threads(threads)
    assert {len(o) < max_new for o in ours} == {True, False}  # both endings compared
    gate = "moe_layers", "moe", "experts", "gate"
    # the adapter is in
    assert not np.array_equal(_at(load_checkpoint(base)[1], gate), _at(params, gate))


def _at(params: dict, path: tuple[str, ...]) -> np.ndarray:
    for key in path:
        params = params[key]
    return np.asarray(params)

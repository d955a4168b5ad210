"""Every bad input the CLI is known to meet: exit code 2, one line on stderr that names the file, line or
`--config.KEY`, no traceback, and nothing written.

The table of cases and their messages in docs/reliability.md is generated from this file:
    ESFT_WRITE_DOCS=1 .venv/bin/python -m pytest -q tests/test_bad_inputs.py
Without ESFT_WRITE_DOCS the test checks that every case here has its row there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import train_fixtures as fx
from safetensors.torch import load_file, save_file

from esft_jax.app import cli
from esft_jax.checkpoint.adapter import write_adapter
from esft_jax.checkpoint.fingerprint import base_metadata, checkpoint_fingerprint
from esft_jax.routing.stats import RoutingStats

DOC = Path(__file__).parents[1] / "docs" / "reliability.md"
BEGIN, END = "<!-- bad-inputs:begin (tests/test_bad_inputs.py) -->", "<!-- bad-inputs:end -->"


@dataclasses.dataclass(frozen=True)
class Files:
    root: Path
    base: Path  # a tiny random checkpoint
    task: Path  # a training jsonl
    experts: Path  # an expert config
    adapter: Path


@dataclasses.dataclass(frozen=True)
class Case:
    what: str  # the bad input, as the docs table says it
    argv: Callable[[Files], list[str]]
    names: str  # what the message must name


# in an argv: the arguments before it are a valid command's, shown as "..." in the docs
COMMON = "..."


_HELD: list[socket.socket] = []


def _busy_port() -> int:
    """A loopback port in use: a socket this process listens on, held while the tests run."""
    if not _HELD:
        _HELD.append(socket.create_server(("127.0.0.1", 0)))
    return _HELD[0].getsockname()[1]


def _serve(f: Files) -> list[str]:
    return ["serve", "--config", "configs/serve.py", f"--config.checkpoint={f.base}"]


def _train(f: Files, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        "configs/train.py:esft",
        f"--config.checkpoint={f.base}",
        f"--config.data.train={f.task}",
        f"--config.expert_config={f.experts}",
        f"--config.workdir={f.root / 'workdir'}",
        "--config.data.seq_len=64",
        "--config.steps=1",
        COMMON,
        *extra,
    ]


def _eval(f: Files, *extra: str) -> list[str]:
    return [
        "eval",
        "--config",
        "configs/eval.py",
        f"--config.checkpoint={f.base}",
        f"--config.out_dir={f.root / 'eval'}",
        COMMON,
        *extra,
    ]


def _select(f: Files, *extra: str) -> list[str]:
    return [
        "select",
        "--config",
        "configs/select.py:token",
        f"--config.stats={f.root}",
        f"--config.out={f.root / 'selected.json'}",
        COMMON,
        *extra,
    ]


def _profile(f: Files, *extra: str) -> list[str]:
    return [
        "profile",
        "--config",
        "configs/profile.py",
        f"--config.checkpoint={f.base}",
        f"--config.data={f.task}",
        "--config.seq_len=64",
        f"--config.out_dir={f.root / 'profile'}",
        COMMON,
        *extra,
    ]


def _drift(f: Files, before: Path, after: Path) -> list[str]:
    return [
        "analyze",
        "--config",
        "configs/analyze.py:drift",
        f"--config.out_dir={f.root / 'analysis'}",
        COMMON,
        f"--config.drift.before={before}",
        f"--config.drift.after={after}",
    ]


def _stats_file(f: Files, name: str, layers: list[int]) -> Path:
    """Empty routing statistics of a model with these MoE layers (4 experts, top-1)."""
    return RoutingStats.empty(layers, 4, 1).save(f.root / f"{name}.npz")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _foreign_adapter(f: Files) -> Path:
    """An adapter recorded as trained on another base (same architecture, other weights)."""
    adapter = f.root / "foreign_adapter"
    if not adapter.exists():
        other = fx.base_checkpoint(f.root / "other_base", seed=1)
        base = base_metadata(str(other), checkpoint_fingerprint(other))
        write_adapter(adapter, {}, {"method": "esft", "model_type": "deepseek_v2", **base})
    return adapter


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


_CONFIG_FILE = (
    "import ml_collections\n\n\ndef get_config():\n    return ml_collections.ConfigDict(dict({}))\n"
)


def _parquet(path: Path, **columns: list) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _truncated_checkpoint(f: Files) -> Path:
    bad = f.root / "truncated"
    if not bad.exists():
        bad.mkdir()
        for p in f.base.iterdir():
            (bad / p.name).write_bytes(p.read_bytes())
        weights = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return bad


def _corrupt_adapter(f: Files) -> Path:
    bad = f.root / "corrupt_adapter"
    if not bad.exists():
        bad.mkdir()
        (bad / "adapter_config.json").write_text((f.adapter / "adapter_config.json").read_text())
        (bad / "adapter.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    return bad


def _quantised_checkpoint(f: Files, method: str) -> Path:
    """The base with config.json's quantization_config of `method`; for "fp8", one tensor stored as
    FP8 without the scales that would make it readable."""
    bad = f.root / f"quantised_{method}"
    if not bad.exists():
        bad.mkdir()
        for p in f.base.iterdir():
            (bad / p.name).write_bytes(p.read_bytes())
        config = json.loads((bad / "config.json").read_text())
        config["quantization_config"] = {"quant_method": method, "weight_block_size": [128, 128]}
        (bad / "config.json").write_text(json.dumps(config))
        if method == "fp8":
            tensors = load_file(bad / "model.safetensors")
            name = "model.layers.1.self_attn.o_proj.weight"
            tensors[name] = tensors[name].to(torch.float8_e4m3fn)
            save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


CASES = [
    # config files and overrides
    Case(
        "config file that does not exist",
        lambda f: ["train", "--config", "configs/trian.py"],
        "configs/trian.py",
    ),
    Case(
        "unknown preset (train)",
        lambda f: ["train", "--config", "configs/train.py:esfft"],
        "'esfft'",
    ),
    Case(
        "unknown preset (select)",
        lambda f: ["select", "--config", "configs/select.py:tokn"],
        "'tokn'",
    ),
    Case(
        "config file with a syntax error",
        lambda f: ["route", "--config", str(_write(f.root / "broken.py", "def get_config(:\n"))],
        "broken.py:1",
    ),
    Case(
        "config file of another command (train given eval's)",
        lambda f: ["train", "--config", "configs/eval.py"],
        "configs/eval.py is a config for `esft eval`, not `esft train`",
    ),
    Case(
        "config file of another command (serve given train's)",
        lambda f: ["serve", "--config", "configs/train.py:esft"],
        "configs/train.py is a config for `esft train`, not `esft serve`",
    ),
    Case(
        "config file of another command (profile given select's)",
        lambda f: ["profile", "--config", "configs/select.py:token", "--config.data=x.jsonl"],
        "configs/select.py is a config for `esft select`, not `esft profile`",
    ),
    Case(
        "config file of no command",
        lambda f: [
            "data",
            "--config",
            str(_write(f.root / "partial.py", _CONFIG_FILE.format("n_train=1, n_eval=1"))),
        ],
        "partial.py: not a config for `esft data`: it lacks n_docs, out, overwrite, seed",
    ),
    Case("unknown config key", lambda f: _train(f, "--config.optim.lrr=0.1"), "--config.optim.lrr"),
    Case(
        "value of the wrong type",
        lambda f: _train(f, "--config.batch_size=eight"),
        "--config.batch_size",
    ),
    # out-of-range values
    Case("p above 1", lambda f: _select(f, "--config.p=1.5"), "--config.p=1.5"),
    Case("p of 0", lambda f: _select(f, "--config.p=0.0"), "--config.p=0.0"),
    Case("unknown score function", lambda f: _select(f, "--config.score=tokens"), "--config.score"),
    Case("batch_size 0", lambda f: _train(f, "--config.batch_size=0"), "--config.batch_size=0"),
    Case(
        "checkpoint_every 0",
        lambda f: _train(f, "--config.checkpoint_every=0"),
        "--config.checkpoint_every=0",
    ),
    Case("negative steps", lambda f: _train(f, "--config.steps=-5"), "--config.steps=-5"),
    Case(
        "negative general_ratio",
        lambda f: _train(f, "--config.data.general_ratio=-1.0"),
        "--config.data.general_ratio",
    ),
    Case(
        "seq_len above the model's positions (train)",
        lambda f: _train(f, "--config.data.seq_len=100000"),
        "--config.data.seq_len=100000",
    ),
    Case(
        "seq_len above the model's positions (profile)",
        lambda f: _profile(f, "--config.seq_len=100000"),
        "--config.seq_len=100000",
    ),
    Case(
        "token_budget 0 (profile)",
        lambda f: _profile(f, "--config.token_budget=0"),
        "--config.token_budget=0",
    ),
    Case(
        "unknown count mode (profile)",
        lambda f: _profile(f, "--config.count=answers"),
        "--config.count",
    ),
    Case(
        "an adapter on random weights (profile)",
        lambda f: _profile(f, "--config.checkpoint=random", f"--config.adapter={f.adapter}"),
        "--config.adapter",
    ),
    Case(
        "unknown drift score kind (analyze)",
        lambda f: [*_drift(f, f.root, f.root), "--config.drift.score=count"],
        "--config.drift.score",
    ),
    Case(
        "drift statistics of two models (analyze)",
        lambda f: _drift(f, _stats_file(f, "before", [1, 2, 3]), _stats_file(f, "after", [1, 2])),
        "--config.drift.after",
    ),
    # missing or empty inputs
    Case(
        "no --config.checkpoint (random weights not asked for)",
        lambda f: ["train", "--config", "configs/train.py:fft", f"--config.data.train={f.task}"],
        "--config.checkpoint",
    ),
    Case(
        "esft without an expert config",
        lambda f: _train(f, "--config.expert_config="),
        "--config.expert_config",
    ),
    Case(
        "expert config whose experts dict is empty",
        lambda f: _train(
            f,
            "--config.expert_config="
            + str(_write(f.root / "empty_experts.json", '{"experts": {}}')),
        ),
        "empty_experts.json",
    ),
    Case(
        "empty training data file",
        lambda f: _train(f, f"--config.data.train={_write(f.root / 'empty.jsonl', '')}"),
        "empty.jsonl",
    ),
    Case(
        "training data line that is not JSON",
        lambda f: _train(
            f, "--config.data.train=" + str(_write(f.root / "bad.jsonl", '{"text": 1'))
        ),
        "bad.jsonl:1",
    ),
    Case(
        "empty profile data file",
        lambda f: _profile(f, f"--config.data={_write(f.root / 'empty.jsonl', '')}"),
        "empty.jsonl",
    ),
    Case(
        "training data of an unknown format",
        lambda f: _train(f, "--config.data.train=" + str(_write(f.root / "data.csv", "text\nx\n"))),
        "data.csv: unknown data format",
    ),
    Case(
        "unknown data format name",
        lambda f: _train(f, "--config.data.format=csv"),
        "--config.data.format",
    ),
    Case(
        "unknown chat template name",
        lambda f: _train(f, "--config.data.template=chatml"),
        "--config.data.template='chatml': expected model, esft or a path ending in .jinja",
    ),
    Case(
        "chat template that is not Jinja",
        lambda f: _train(
            f, f"--config.data.template={_write(f.root / 'broken.jinja', '{% if %}')}"
        ),
        "broken.jinja:1: not a Jinja template",
    ),
    Case(
        "chat template that refuses the data",
        lambda f: _train(
            f,
            "--config.data.template="
            + str(_write(f.root / "refuse.jinja", "{{ raise_exception('no chats here') }}")),
        ),
        "task.jsonl:1: chat template",
    ),
    Case(
        "unknown loss_on",
        lambda f: _train(f, "--config.data.loss_on=prompt"),
        "--config.data.loss_on",
    ),
    Case(
        "parquet without a known column set",
        lambda f: _train(
            f, f"--config.data.train={_parquet(f.root / 'columns.parquet', a=[1], b=['x'])}"
        ),
        "found: a, b",
    ),
    Case(
        "training data that is not UTF-8",
        lambda f: _train(
            f,
            "--config.data.train="
            + str(_write_bytes(f.root / "latin1.jsonl", b'{"text": "caf\xe9"}\n')),
        ),
        "latin1.jsonl:1",
    ),
    Case(
        "training data line that is not JSON, mid-file",
        lambda f: _train(
            f,
            "--config.data.train="
            + str(_write(f.root / "mid.jsonl", f.task.read_text() + '{"text": 1\n{"text": "x"}\n')),
        ),
        "mid.jsonl:17: not valid JSON (Expecting ',' delimiter, column 11)",
    ),
    Case(
        "directory without a dataset as training data",
        lambda f: _train(f, f"--config.data.train={_mkdir(f.root / 'no_data')}"),
        "no_data: is a directory with no .parquet or .arrow files",
    ),
    Case(
        "expert config that is not UTF-8",
        lambda f: _train(
            f,
            "--config.expert_config="
            + str(_write_bytes(f.root / "latin1.json", b'{"experts": {"1": [3]}, "x": "\xe9"}')),
        ),
        "latin1.json:1: not UTF-8 (byte 0xe9 at column 31)",
    ),
    Case(
        "chat template that is not UTF-8",
        lambda f: _train(
            f,
            "--config.data.template="
            + str(_write_bytes(f.root / "latin1.jinja", b"{{ bos_token }}\n caf\xe9")),
        ),
        "latin1.jinja:2: not UTF-8 (byte 0xe9 at column 5)",
    ),
    Case(
        "seq_len too short for any answer (train)",
        lambda f: _train(f, "--config.data.seq_len=16"),
        "--config.data.seq_len=16",
    ),
    Case(
        "seq_len too short for any answer (profile, count=answer)",
        lambda f: _profile(f, "--config.seq_len=16", "--config.count=answer"),
        "--config.seq_len=16",
    ),
    Case(
        "checkpoint directory without config.json",
        lambda f: _eval(f, f"--config.checkpoint={f.root}", f"--config.perplexity.data={f.task}"),
        "config.json",
    ),
    Case(
        "truncated safetensors (model)",
        lambda f: _eval(
            f,
            f"--config.checkpoint={_truncated_checkpoint(f)}",
            f"--config.perplexity.data={f.task}",
        ),
        "model.safetensors",
    ),
    Case(
        "corrupt safetensors (adapter)",
        lambda f: _eval(
            f, f"--config.adapter={_corrupt_adapter(f)}", f"--config.perplexity.data={f.task}"
        ),
        "adapter.safetensors",
    ),
    Case(
        "quantised checkpoint esft cannot read (GPTQ)",
        lambda f: _eval(
            f,
            f"--config.checkpoint={_quantised_checkpoint(f, 'gptq')}",
            f"--config.perplexity.data={f.task}",
        ),
        "config.json: quantization_config has quant_method 'gptq'",
    ),
    Case(
        "FP8 tensor without its scales",
        lambda f: _eval(
            f,
            f"--config.checkpoint={_quantised_checkpoint(f, 'fp8')}",
            f"--config.perplexity.data={f.task}",
        ),
        "o_proj.weight is stored as F8_E4M3 without scales",
    ),
    Case(
        "official routing log that is not UTF-8 (select)",
        lambda f: _select(
            f,
            "--config.stats="
            + str(_write_bytes(f.root / "logs" / "expert_weights_1.txt", b"1\t2\xe9\n").parent),
        ),
        "expert_weights_1.txt:1: not UTF-8 (byte 0xe9 at column 4)",
    ),
    Case(
        "select without statistics",
        lambda f: _select(f, f"--config.stats={f.root / 'none'}"),
        "--config.stats",
    ),
    # evaluation
    Case("eval with no tasks", lambda f: _eval(f), "--config.tasks"),
    Case(
        "eval set that is not UTF-8 (nothing written, out_dir included)",
        lambda f: _eval(
            f,
            "--config.tasks.intent.data="
            + str(_write_bytes(f.root / "latin1_eval.jsonl", b'{"prompt": "\xe9", "answers": []}')),
        ),
        "latin1_eval.jsonl:1: not UTF-8 (byte 0xe9 at column 13)",
    ),
    Case(
        "perplexity data that is not UTF-8",
        lambda f: _eval(
            f,
            "--config.perplexity.data="
            + str(_write_bytes(f.root / "latin1.jsonl", b'{"text": "caf\xe9"}\n')),
        ),
        "latin1.jsonl:1: not UTF-8 (byte 0xe9 at column 14)",
    ),
    Case(
        "judge scorer without an endpoint",
        lambda f: _eval(f, f"--config.tasks.law.data={f.task}"),
        "--config.judge.base_url",
    ),
    Case(
        "unknown scorer",
        lambda f: _eval(
            f, f"--config.tasks.intent.data={f.task}", "--config.tasks.intent.scorer=bleurt"
        ),
        "--config.tasks.intent.scorer",
    ),
    # where outputs go
    Case(
        "mesh larger than the devices",
        lambda f: [
            "route",
            "--config",
            "configs/route.py",
            "--config.checkpoint=random",
            "--config.mesh.expert=16",
        ],
        "--config.mesh",
    ),
    Case(
        "read-only output directory (profile)",
        lambda f: _profile(f, "--config.out_dir=/sys/esft-profile"),
        "--config.out_dir=/sys/esft-profile",
    ),
    Case(
        "output directory that is a file (eval)",
        lambda f: _eval(f, f"--config.perplexity.data={f.task}", f"--config.out_dir={f.task}"),
        "--config.out_dir",
    ),
    Case(
        "export into a directory it did not write",
        lambda f: [
            "export",
            "--config",
            "configs/export.py",
            f"--config.checkpoint={f.base}",
            f"--config.adapter={f.adapter}",
            f"--config.out={_write(f.root / 'mine' / 'notes.txt', 'keep me').parent}",
        ],
        "--config.out",
    ),
    Case(
        "export over its own base checkpoint",
        lambda f: [
            "export",
            "--config",
            "configs/export.py",
            f"--config.checkpoint={f.base}",
            f"--config.adapter={f.adapter}",
            f"--config.out={f.base}",
        ],
        "--config.out",
    ),
    Case(
        "adapter trained on another base (export)",
        lambda f: [
            "export",
            "--config",
            "configs/export.py",
            f"--config.checkpoint={f.base}",
            f"--config.adapter={_foreign_adapter(f)}",
            f"--config.out={f.root / 'exported'}",
        ],
        "allow_other_base",
    ),
    Case(
        "built-in data into a non-empty directory",
        lambda f: [
            "data",
            "--config",
            "configs/data.py",
            f"--config.out={_write(f.root / 'mine' / 'notes.txt', 'keep me').parent}",
        ],
        "--config.out",
    ),
    Case(
        "plan whose batch does not split over the devices",
        lambda f: [
            "plan",
            "--config",
            "configs/plan.py",
            "--config.devices=(1, 3)",
            "--config.batch_size=8",
        ],
        "--config.batch_size",
    ),
    Case(
        "sequence length beyond the model's positions (plan)",
        lambda f: [
            "plan",
            "--config",
            "configs/plan.py",
            f"--config.checkpoint={f.base}",
            "--config.devices=(1,)",
            "--config.seq_len=100000",
        ],
        "--config.seq_len=100000",
    ),
    Case(
        "a port in use (serve)",
        lambda f: [*_serve(f), f"--config.port={_busy_port()}"],
        "cannot listen there",
    ),
    Case(
        "an adapter named like the base model (serve)",
        lambda f: [*_serve(f), f"--config.adapters.base={f.adapter}"],
        "--config.adapters.base: is the base model's name",
    ),
    Case(
        "an audit log that cannot be written (serve)",
        lambda f: [*_serve(f), f"--config.monitor.audit_log={f.task}/audit.jsonl"],
        "--config.monitor.audit_log",
    ),
    Case(
        "study without a checkpoint (official data)",
        lambda f: [
            "run",
            "--config",
            "configs/experiments/official.py:intent",
            f"--config.run_dir={f.root / 'study'}",
        ],
        "--config.checkpoint",
    ),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("bad_inputs")
    base = fx.base_checkpoint(root / "base")
    adapter = write_adapter(root / "adapter", {}, {"method": "esft", "model_type": "deepseek_v2"})
    return Files(
        root,
        base,
        fx.task_dataset(root / "task.jsonl", n=16),
        fx.EXPERTS.save(root / "experts.json"),
        adapter,
    )


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def _run(case: Case, files: Files, capfd) -> str:
    argv = [a for a in case.argv(files) if a != COMMON]
    before = _tree(files.root)
    capfd.readouterr()
    assert cli.main(argv) == 2, case.what
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"esft {argv[0]}: error: "), err
    assert case.names in lines[0] and "Traceback" not in err, lines[0]
    created = sorted(k for k in _tree(files.root) if k not in before)
    assert not created, created  # refused before anything was written
    return lines[0]


def _row(case: Case, files: Files, message: str) -> str:
    """The docs table's row: the command (a valid command's arguments shown as ...) and the message."""

    def shown(text: str) -> str:  # temporary paths and the busy port as placeholders
        text = text.replace(str(files.root), "<tmp>")
        if _HELD:
            text = text.replace(f"port={_busy_port()}", "port=<in use>")
        return re.sub(r"\s+", " ", text).replace("|", "\\|")

    argv = case.argv(files)
    if COMMON in argv:
        argv = [*argv[:3], COMMON, *argv[argv.index(COMMON) + 1 :]]
    return (
        f"| {case.what} | `{shown('esft ' + ' '.join(argv))}` "
        f"| {shown(message.partition(': error: ')[2])} |"
    )


def test_every_bad_input_is_one_line_and_exit_2(files, capfd):
    rows = [_row(case, files, _run(case, files, capfd)) for case in CASES]
    table = "\n".join(["| bad input | command | message |", "|---|---|---|", *rows])
    if os.environ.get("ESFT_WRITE_DOCS"):
        head, _, rest = DOC.read_text().partition(BEGIN)
        DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.partition(END)[2]}")
    documented = DOC.read_text().partition(BEGIN)[2].partition(END)[0]
    missing = [case.what for case in CASES if f"| {case.what} |" not in documented]
    assert not missing, (
        f"docs/reliability.md lacks rows for {missing}: rerun with ESFT_WRITE_DOCS=1"
    )

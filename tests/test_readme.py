"""Every command block of README.md runs as written on a fresh clone (one slow test, ~60 s).

How: README.md is split into fenced blocks. Each ```bash block's commands (`\\` continuations
joined, comments dropped, leading VAR=value words set in the environment) run one by one, and each
```python block as a script, in a copy of the repository without runs/ and data/ (what a fresh
clone holds) with `.venv` (what `make test` installs) linked in and its bin/ first on PATH.
`esft ...` (or that script's path) runs in this process through cli.main, what the `esft` script
calls, when the variables it sets already have their values here (the 8 simulated devices of
tests/conftest.py), and a python block runs here through runpy (saving a start-up each and
sharing compiled programs); the rest run as child processes. Adjustments that keep it offline and
short:
- MODEL: `/models/ESFT-vanilla-lite`, not on this machine, becomes the built-in pretrained tiny MoE;
- SMALL: each command gets small sizes appended as overrides, chosen by its config file (a later
  override wins); a command whose config file SMALL does not list fails the test, so a new README
  command must choose its sizes here;
- a command that sets XLA_FLAGS keeps the tests' fast-compile flags (tests/conftest.py) it does not
  set itself;
- a block whose fence follows the line `<!-- readme-test: skip: REASON -->` is skipped (a cluster,
  libtpu, the real checkpoint, the full study); the reason is required.
A command that exits non-zero fails the test, with its output.
"""

import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from esft_jax import cli
from esft_jax.builtin import suite as builtin_suite

REPO = Path(__file__).resolve().parents[1]
MODEL = "/models/ESFT-vanilla-lite"
TINY_MOE = str(Path(builtin_suite.__file__).parent / "tiny_moe")
SKIP = re.compile(r"<!-- readme-test: skip: (.+\S) -->")
FENCE = re.compile(r"^```(\w*)\s*$")
# `esft run`: profile + select, then the training commands (`make run` is the full study; tests/
# test_experiment.py runs it on a tiny model)
STUDY = [
    "--config.launch=print",
    "--config.profile.token_budget=1024",
    "--config.profile.seq_len=128",
]
SMALL = {
    "configs/data.py": ["--config.n_train=64", "--config.n_eval=8", "--config.n_docs=8"],
    "configs/route.py": [],
    "configs/plan.py": [
        "--config.devices=(1,)",
        "--config.methods=esft",
        "--config.batch_size=1",
        "--config.seq_len=32",
    ],
    "configs/profile.py": [
        "--config.token_budget=1024",
        "--config.seq_len=128",
        "--config.progress=False",
    ],
    "configs/select.py": [],
    "configs/analyze.py": [],
    "configs/train.py": [
        "--config.steps=2",
        "--config.batch_size=2",
        "--config.data.seq_len=64",
        "--config.log_every=1",
        "--config.data.validation_fraction=0.0",
    ],
    "configs/export.py": [],
    "configs/eval.py": [
        "--config.tasks.intent.limit=2",
        "--config.tasks.intent.max_new_tokens=8",
        "--config.batch_size=16",
        "--config.perplexity.seq_len=64",
    ],
    "configs/experiments/builtin.py": STUDY,
    "configs/experiments/ablations.py": STUDY,
    "configs/experiments/main.py": [
        "--config.launch=print",
        *(
            f"--config.studies.{task}.profile.{key}={value}"
            for task in builtin_suite.DOWNSTREAM
            for key, value in (("token_budget", 1024), ("seq_len", 128))
        ),
    ],
}


def blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, body, skip reason or "") of every fenced block."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        skip = SKIP.fullmatch(lines[i - 1].strip()) if i else None
        found.append((opening[1], "\n".join(lines[i + 1 : end]), skip[1] if skip else ""))
        i = end + 1
    return found


def _environment(words: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the command, the variables its leading VAR=value words set); an XLA_FLAGS set keeps the
    flags of this session's XLA_FLAGS that it does not set itself."""
    env = {}
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        if name == "XLA_FLAGS":
            names = {flag.split("=")[0] for flag in value.split()}
            value = " ".join(
                [
                    value,
                    *(f for f in os.environ.get(name, "").split() if f.split("=")[0] not in names),
                ]
            )
        env[name] = value
    return words, env


def commands(body: str) -> list[list[str]]:
    """The shell words of each command of a bash block, MODEL replaced and SMALL's sizes appended."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line.replace(MODEL, TINY_MOE), comments=True)
        if not words:
            continue
        if "--config" in words:
            config = words[words.index("--config") + 1].partition(":")[0]
            assert config in SMALL, (
                f"README command with {config}: give it small sizes in SMALL ({line})"
            )
            words += SMALL[config]
        out.append(words)
    return out


def fresh_clone(dest: Path) -> Path:
    """The repository's files without what running it writes (runs/, data/), plus a link to .venv."""
    top_level = {".git", ".venv", "runs", "data", ".pytest_cache"}
    shutil.copytree(
        REPO,
        dest,
        symlinks=True,
        ignore=lambda folder, names: {
            n
            for n in names
            if n == "__pycache__"
            or n.endswith(".egg-info")
            or (Path(folder) == REPO and n in top_level)
        },
    )
    (dest / ".venv").symlink_to(sys.prefix)
    return dest


def _in_process(argv: list[str], env: dict[str, str], clone: Path) -> bool:
    """Whether a command is the venv's `esft` script (`esft` or a path to it) with every variable it
    sets already so in this process (XLA_FLAGS compared as a set of flags)."""
    script = Path(sys.executable).parent / "esft"
    if argv[0] != "esft" and (clone / argv[0]).resolve() != script.resolve():
        return False
    return all(
        set(value.split()) == set(os.environ.get(name, "").split())
        if name == "XLA_FLAGS"
        else value == os.environ.get(name)
        for name, value in env.items()
    )


def run_command(argv: list[str], env: dict[str, str], clone: Path, capsys) -> None:
    """Run one command in the clone (in this process if it is the `esft` script with nothing to
    change in the environment, or a python block); fail on an error."""
    if argv[0] == sys.executable and not env:  # a python block, as __main__
        capsys.readouterr()
        runpy.run_path(argv[1], run_name="__main__")
        code, output = 0, ""
    elif _in_process(argv, env, clone):
        capsys.readouterr()
        code = cli.main(argv[1:])
        out = capsys.readouterr()
        output = out.out + out.err
    else:
        proc = subprocess.run(
            argv, cwd=clone, env={**os.environ, **env}, capture_output=True, text=True, timeout=600
        )
        code, output = proc.returncode, proc.stdout + proc.stderr
    assert code == 0, f"{shlex.join(argv)}\n{output[-3000:]}"


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "esft").is_file():
        pytest.skip(f"no `esft` script beside {sys.executable} (pip install -e . installs it)")
    clone = fresh_clone(tmp_path / "clone")
    monkeypatch.setenv("PATH", f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(clone)
    text = (REPO / "README.md").read_text()
    markers = [
        line for line in text.splitlines() if line.startswith("<!--") and "readme-test" in line
    ]
    assert all(SKIP.fullmatch(line.strip()) for line in markers), (
        markers
    )  # none misspelt, none without a reason
    ran = []
    for language, body, reason in blocks(text):
        if reason or language not in ("python", "bash"):
            continue
        if language == "python":
            script = tmp_path / f"readme_block_{len(ran)}.py"
            script.write_text(body.replace(MODEL, TINY_MOE))
            runs = [([sys.executable, str(script)], {})]
        else:
            runs = [_environment(words) for words in commands(body)]
        for argv, env in runs:
            run_command(argv, env, clone, capsys)
            ran.append(argv)
    assert len(ran) > 20  # the README's blocks were found


def test_esft_data_writes_every_data_path_the_readme_names_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "data" / "builtin"
    assert (
        cli.main(
            [
                "data",
                "--config",
                "configs/data.py",
                f"--config.out={out}",
                "--config.n_train=3",
                "--config.n_eval=2",
                "--config.n_docs=2",
            ]
        )
        == 0
    )
    named = set(re.findall(r"data/builtin/[\w/]+\.jsonl", (REPO / "README.md").read_text()))
    assert len(named) >= 4 and all((tmp_path / path).is_file() for path in named), named
    assert len((out / "eval" / "docs.jsonl").read_text().splitlines()) == 2
    before = {p: p.read_bytes() for p in out.rglob("*.jsonl")}
    capsys.readouterr()
    assert cli.main(["data", "--config", "configs/data.py", f"--config.out={out}"]) == 2
    assert capsys.readouterr().err == (
        f"esft data: error: --config.out={out}: the directory is not empty "
        "(choose another, or --config.overwrite=True)\n"
    )
    assert {p: p.read_bytes() for p in out.rglob("*.jsonl")} == before

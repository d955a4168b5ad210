"""Every command block of README.md runs as written on a fresh clone (one slow test).

How: README.md is split into fenced blocks. Each ```bash block's commands (`\\` continuations
joined, comments dropped, `$VAR`s expanded, leading VAR=value words set in the environment) run one
by one, and each ```python block as a script, in a copy of the repository without runs/ and data/
(what a fresh clone holds) with `.venv` (what `make test` installs) linked in. The README's own
first steps are honoured: `source .venv/bin/activate` (its bin/ first on PATH) and `export
VAR=value` (MODEL: the built-in model). `esft ...` (or that script's path) runs in this process
through cli.main, what the `esft` script calls, when the variables it sets already have their values
here (the 8 simulated devices of tests/conftest.py), and a python block runs here through runpy
(saving a start-up each and sharing compiled programs); the rest run as child processes. Nothing is
appended to a command: the only shortening is ESFT_MAX_STEPS=2, which the README offers to try
commands fast (esft_jax/app/step_cap.py: loops cut to two steps). A command that sets XLA_FLAGS keeps
the tests' fast-compile flags (tests/conftest.py) it does not set itself. A block whose fence
follows the line `<!-- readme-test: skip: REASON -->` is skipped (a cluster, libtpu, the real
checkpoint, a whole study); the reason is required. A command that exits non-zero fails the test,
with its output; a block that is run may name no file outside the clone (/models/...).
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

from esft_jax.app import cli

REPO = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!-- readme-test: skip: (.+\S) -->")
FENCE = re.compile(r"^```(\w*)\s*$")
ACTIVATE = "source .venv/bin/activate"  # the README's first step: .venv/bin first on PATH
STEPS = "2"  # ESFT_MAX_STEPS, as the README offers it to try commands fast


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
    """The shell words of each command of a bash block, `$VAR`s expanded from the environment."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        words = [os.path.expandvars(w) for w in shlex.split(line, comments=True)]
        if words:
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
    # none misspelt, none without a reason
    assert all(SKIP.fullmatch(line.strip()) for line in markers), markers
    monkeypatch.setenv("ESFT_MAX_STEPS", STEPS)
    ran = []
    for language, body, reason in blocks(text):
        if reason or language not in ("python", "bash"):
            continue
        if language == "python":
            script = tmp_path / f"readme_block_{len(ran)}.py"
            script.write_text(body)
            runs = [([sys.executable, str(script)], {})]
        else:
            runs = [_environment(words) for words in commands(body)]
        for argv, env in runs:
            if " ".join(argv) == ACTIVATE:  # PATH already starts with the venv's bin/
                continue
            if argv[0] == "export":
                for name, _, value in (word.partition("=") for word in argv[1:]):
                    monkeypatch.setenv(name, value)
                continue
            assert "/models/" not in " ".join(argv), (
                f"a README command names a file not here: {argv}"
            )
            run_command(argv, env, clone, capsys)
            ran.append(argv)
    assert len(ran) > 15 and os.environ["MODEL"]  # the README's blocks and first steps were found


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

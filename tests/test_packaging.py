"""`esft` from any directory: the config files ship with the package and `configs/...` paths resolve
against them when the working directory has none."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
import tomllib

from esft_jax.app import config_files

ROOT = Path(__file__).resolve().parents[1]


def test_a_config_path_resolves_in_the_working_directory_first(tmp_path, monkeypatch):
    # the tests run at the root
    assert config_files.resolve("configs/train.py") == Path("configs/train.py")
    monkeypatch.chdir(tmp_path)
    # a checkout's bundled dir
    assert config_files.resolve("configs/train.py") == ROOT / "configs" / "train.py"
    # stays missing: the error names it
    assert config_files.resolve("configs/nope.py") == Path("configs/nope.py")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "train.py").write_text("")
    assert config_files.resolve("configs/train.py") == Path("configs/train.py")  # a local copy wins


@pytest.mark.slow  # a child process
def test_esft_runs_from_another_directory(tmp_path):
    """`esft route` reads configs/route.py and its model file from the shipped configs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "esft_jax.app.cli",
            "route",
            "--config",
            "configs/route.py:tiny",
            "--config.checkpoint=random",
            "--config.batch_size=1",
            "--config.seq_len=8",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "32 routed experts, top-4" in proc.stdout


def test_the_wheel_holds_every_package_and_the_config_files():
    """pyproject lists the packages (one is mapped from configs/): none may be missing."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {p for p in setuptools.find_packages(str(ROOT), include=["esft_jax*"])}
    assert found <= set(tool["packages"]), found - set(tool["packages"])
    bundled = ROOT / tool["package-dir"]["esft_jax.bundled_configs"]
    assert bundled == config_files.bundled_dir()
    folders = {
        p.parent for p in bundled.rglob("*.py")
    }  # each a package of the wheel, its .py files shipped
    assert {
        "esft_jax.bundled_configs" + ".".join(("", *f.relative_to(bundled).parts)) for f in folders
    } <= set(tool["packages"])

"""`esft data`: write the built-in task suite."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from esft_jax.app.checks import whole, writable_dir
from esft_jax.app.config_files import ConfigFileError
from esft_jax.builtin import suite as builtin_suite
from esft_jax.builtin.suite import HELD_OUT_DOCS


def check(c: ml_collections.ConfigDict) -> None:
    for key in ("n_train", "n_eval", "n_docs"):
        whole(c, key)
    if c.n_docs > HELD_OUT_DOCS:
        raise ConfigFileError(
            f"--config.n_docs={c.n_docs}: there are {HELD_OUT_DOCS} held-out docs"
        )
    writable_dir(c, "out")
    out = Path(c.out)
    if out.is_dir() and any(out.iterdir()) and not c.overwrite:
        raise ConfigFileError(
            f"--config.out={out}: the directory is not empty (choose another, or "
            f"--config.overwrite=True)"
        )


def run(c: ml_collections.ConfigDict) -> None:
    """Write the built-in task suite: <out>/train/<task>.jsonl and <out>/eval/<task>.jsonl."""
    out = Path(c.out)
    builtin_suite.write_suite(out, n_train=c.n_train, n_eval=c.n_eval, seed=c.seed, n_docs=c.n_docs)
    tasks = ", ".join([*builtin_suite.DOWNSTREAM, *builtin_suite.GENERAL])
    print(
        f"built-in suite ({tasks}: {c.n_train} train / {c.n_eval} eval samples each) "
        f"-> {out}/train, {out}/eval"
    )

"""`esft serve`: an OpenAI-compatible HTTP server over one base model and any number of ESFT adapters.

    esft serve --config configs/serve.py:intent=runs/intent-esft/adapter,law=runs/law-esft/adapter \
        --config.checkpoint=/models/ESFT-vanilla-lite

The argument after ":" names the adapters (name=directory pairs, comma-separated); a request's
`model` is an adapter's name, or the base model's (its checkpoint directory's name). Binds
127.0.0.1 unless --config.host says otherwise; with --config.api_key set, requests must send
`Authorization: Bearer KEY`. Requests arriving within batch_window_ms of each other (at most
max_batch) share one generation (esft_jax/serve/batcher.py).
"""

import ml_collections

from esft_jax import config_blocks as blocks


def get_config(adapters: str = "") -> ml_collections.ConfigDict:
    c = blocks.model_source(ml_collections.ConfigDict())
    c.seed = 0  # random weights (checkpoint="random") only
    pairs = [pair for pair in adapters.split(",") if pair]
    bad = [pair for pair in pairs if "=" not in pair]
    if bad:
        raise ValueError(f"expected NAME=DIR pairs after ':', got {bad[0]!r}")
    # name -> adapter directory (esft train's <workdir>/adapter)
    c.adapters = ml_collections.ConfigDict(dict(pair.split("=", 1) for pair in pairs))
    c.host = "127.0.0.1"
    c.port = 8000
    c.api_key = ""
    c.max_batch = 8
    c.batch_window_ms = 10
    c.mesh = blocks.mesh()
    return c

"""`esft serve`: an OpenAI-compatible HTTP server over one base model and any number of ESFT adapters.

    esft serve --config configs/serve.py --config.checkpoint=/models/ESFT-vanilla-lite \
        --config.adapters.intent=runs/intent-esft/adapter --config.adapters.law=runs/law-esft/adapter
    esft serve --config configs/serve.py:intent=runs/intent-esft/adapter,law=... (the same)

Each `adapters.NAME=DIR` (or NAME=DIR pair after ":") serves an adapter; a request's `model` is an
adapter's name, or the base model's (its checkpoint directory's name). Binds 127.0.0.1 unless
--config.host says otherwise; with --config.api_key set, requests must send
`Authorization: Bearer KEY`. Up to `rows` requests decode together, each of at most max_len
tokens (prompt + max_tokens; 0: the model's context); more wait for a free row
(esft_jax/serve/worker.py).
"""

import ml_collections

from esft_jax.app import config_blocks as blocks
from esft_jax.app.config_files import OpenConfigDict


def get_config(adapters: str = "") -> ml_collections.ConfigDict:
    c = blocks.model_source(ml_collections.ConfigDict())
    c.seed = 0  # random weights (checkpoint="random") only
    pairs = [pair for pair in adapters.split(",") if pair]
    bad = [pair for pair in pairs if "=" not in pair]
    if bad:
        raise ValueError(f"expected NAME=DIR pairs after ':', got {bad[0]!r}")
    # name -> adapter directory (esft train's <workdir>/adapter)
    c.adapters = OpenConfigDict(dict(pair.split("=", 1) for pair in pairs))
    # serve adapters whose recorded base (adapter_config.json) is another checkpoint
    c.allow_other_base = False
    # chat requests' format: "model" (the checkpoint's chat template, else ESFT's), "esft" or a
    # PATH.jinja (esft_jax/data/chat.py)
    c.template = "model"
    c.host = "127.0.0.1"
    c.port = 8000
    c.api_key = ""
    c.rows = 8  # requests decoding together (the batch's rows, each with its KV cache)
    c.max_len = 0  # tokens per row (prompt + max_tokens); 0: the model's context
    # a request body longer than this is refused (413) before it is read whole
    c.max_body_bytes = 4 * 2**20
    # The routing monitor (esft_jax/serve/monitor.py): a request whose coverage falls below
    # ood_ratio x its adapter's profiled coverage is flagged out-of-domain; with fallback=True it is
    # answered by the base model instead. audit_log: a jsonl file, one line per request ("" for none),
    # without prompt text unless log_prompts.
    c.monitor = ml_collections.ConfigDict(
        dict(ood_ratio=0.5, fallback=False, audit_log="", log_prompts=False)
    )
    c.mesh = blocks.mesh()
    return c

"""`esft data`: write the built-in task suite (esft_jax/builtin/suite.py) in ESFT's jsonl formats.

    esft data --config configs/data.py                 # -> data/builtin/train/<task>.jsonl, eval/<task>.jsonl
Train sets hold ESFT "messages" lines, eval sets {"prompt", "answers"} lines, eval/docs.jsonl held-out
text for perplexity. Tasks: intent, math, sort (downstream), facts, count (general). Deterministic in seed.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out = "data/builtin"
    c.seed = 0
    c.n_train = 2000  # samples per task
    c.n_eval = 200
    c.n_docs = 300  # held-out docs for perplexity (at most the 300 the tiny model never saw)
    c.overwrite = False  # write into a non-empty --config.out
    return c

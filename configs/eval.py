"""`esft eval`: task scores by greedy generation, and held-out perplexity.

    esft eval --config configs/eval.py --config.checkpoint=/models/ESFT-vanilla-lite \
        --config.adapter=runs/intent-esft/adapter \
        --config.tasks.intent.data=../shared/esft-reference/datasets/eval/intent.jsonl
Tasks whose data is "" are skipped. Scorers: intent, exact_match, chrf, bleu, rouge_l, judge
(an OpenAI-compatible endpoint: --config.judge.base_url=http://host:port/v1 --config.judge.model=...).
Writes <out_dir>/<task>.jsonl (predictions and scores) and <out_dir>/scores.json.
With checkpoint="random" c.model is the random weights' architecture; with a checkpoint only its
runtime fields (dtype, moe_strategy, ...) apply and overriding another is an error
(esft_jax/app/config_blocks.py).
"""

import ml_collections

from esft_jax.app import config_blocks as blocks


def _task(scorer: str, max_new_tokens: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            data="",
            format="auto",  # of data: auto (by extension or folder), jsonl, json, parquet, arrow
            scorer=scorer,
            max_new_tokens=max_new_tokens,
            limit=0,
            stop="\n\nUser:",  # stop strings, separated by "|"
        )
    )


def get_config() -> ml_collections.ConfigDict:
    c = blocks.model_source(ml_collections.ConfigDict())
    c.adapter = ""  # an adapter applied to the checkpoint (esft train's <workdir>/adapter)
    # apply an adapter whose recorded base (adapter_config.json) is another checkpoint
    c.allow_other_base = False
    c.seed = 0
    # {"messages"} eval prompts' and held-out chats' format, as esft train's data.template:
    # "model" (the checkpoint's chat template, else ESFT's), "esft" or a PATH.jinja
    c.template = "model"
    c.tasks = ml_collections.ConfigDict(
        dict(
            intent=_task("intent", 64),
            law=_task("judge", 256),
            summary=_task("judge", 256),
            translation=_task("judge", 256),
        )
    )
    # held-out text (any format, as the tasks'; its first `limit` samples, 0: all): general ability
    c.perplexity = ml_collections.ConfigDict(dict(data="", format="auto", seq_len=1024, limit=0))
    c.batch_size = 8
    c.judge = blocks.judge(retries=3)
    c.out_dir = "runs/eval"
    c.mesh = blocks.mesh()
    return c

"""`esft profile`: routing statistics of a model on a task's data.

    esft profile --config configs/profile.py --config.checkpoint=/models/ESFT-vanilla-lite \
        --config.data=../shared/esft-reference/datasets/train/intent.jsonl --config.out_dir=runs/intent
Writes <out_dir>/stats.npz, <out_dir>/summary.json and, with official_logs, <out_dir>/logs/.
With adapter (esft train's <workdir>/adapter) the fine-tuned model is profiled: the "after" of
`esft analyze`'s routing drift.
With checkpoint="random" c.model is the random weights' architecture; with a checkpoint only its
runtime fields (dtype, moe_strategy, ...) apply and overriding another is an error
(esft_jax/app/config_blocks.py).
"""

import ml_collections

from esft_jax.app import config_blocks as blocks

PRESETS = blocks.MODELS  # the model


def get_config(model: str = "tiny") -> ml_collections.ConfigDict:
    c = blocks.model_source(ml_collections.ConfigDict(), model)
    c.adapter = ""  # an adapter applied to the checkpoint: profile the fine-tuned model
    # apply an adapter whose recorded base (adapter_config.json) is another checkpoint
    c.allow_other_base = False
    c.seed = 0
    c.data = ""  # a dataset file or folder (README: Your own data)
    c.data_format = "auto"  # of data: auto (by extension or folder), jsonl, json, parquet, arrow
    # conversations' format, as esft train's data.template: "model", "esft" or a PATH.jinja
    c.template = "model"
    c.skip_invalid = False  # skip (and count) malformed rows instead of stopping
    # which tokens' routing counts: "all" (as the official code), "answer", "prompt"
    c.count = "all"
    c.token_budget = 32 * 4096  # counted tokens to profile (the paper's 32 sequences of 4096)
    # longer documents are truncated; rows hold several documents (segment ids); 0: 4096 (the
    # paper's), or the model's positions (max_position_embeddings) where it has fewer
    c.seq_len = 0
    # batch_size x seq_len token positions a step (short documents: more, shorter packed rows)
    c.batch_size = 8
    # data shards, each read only by the processes holding its batch rows, with its share of the
    # budget (0: one per block of rows a process holds); fixed, any process count agrees
    c.shards = 0
    c.official_logs = False  # also write expert_weights_<layer>.txt in the official format
    c.out_dir = "runs/profile"
    c.progress = True
    c.mesh = blocks.mesh()
    c.distributed = blocks.distributed()
    return c

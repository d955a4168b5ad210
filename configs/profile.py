"""`esft profile`: routing statistics of a model on a task's data.

    esft profile --config configs/profile.py --config.checkpoint=/models/ESFT-vanilla-lite \
        --config.data=../shared/esft-reference/datasets/train/intent.jsonl --config.out_dir=runs/intent
Writes <out_dir>/stats.npz, <out_dir>/summary.json and, with official_logs, <out_dir>/logs/.
"""

from pathlib import Path

import ml_collections

from esft_jax.configs import load_file

PRESETS = tuple(sorted(p.stem for p in (Path(__file__).parent / "models").glob("*.py")))  # the model


def get_config(model: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = load_file(str(Path(__file__).parent / "models" / f"{model}.py"))  # the architecture of checkpoint=random
    c.checkpoint = ""  # a Hugging Face checkpoint directory, or "random" for random weights of c.model
    c.tokenizer = ""  # a directory with tokenizer.json; default: the checkpoint's, else bytes
    c.seed = 0
    c.data = ""  # jsonl: ESFT "messages" lines or {"text": ...} lines
    c.skip_invalid = False  # skip (and count) malformed lines instead of stopping
    c.count = "all"  # which tokens' routing counts: "all" (as the official code), "answer", "prompt"
    c.token_budget = 32 * 4096  # counted tokens to profile (the paper's 32 sequences of 4096)
    c.seq_len = 4096  # longer documents are truncated; rows hold several documents (segment ids)
    c.batch_size = 8  # batch_size x seq_len token slots a step (short documents: more, shorter packed rows)
    c.shards = 0  # data shards, each read only by the processes holding its batch rows, with its share of
                  # the budget (0: one per block of rows a process holds); fixed, any process count agrees
    c.official_logs = False  # also write expert_weights_<layer>.txt in the official format
    c.out_dir = "runs/profile"
    c.progress = True
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))  # over all processes' devices
    # multi-process: num_processes > 1 with coordinator "host:port" and process_id, or -1 (auto-detect)
    c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0))
    return c

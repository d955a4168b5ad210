"""`esft route`: run one batch through a model and print how each MoE layer routes it.

    esft route --config configs/route.py:tiny
    esft route --config configs/route.py --config.checkpoint=/path/to/hf_dir --config.text="Hello"
    esft route --config configs/route.py:tiny --config.mesh.data=2 --config.mesh.expert=4
"""

from pathlib import Path

import ml_collections

from esft_jax.configs import load_file

PRESETS = tuple(sorted(p.stem for p in (Path(__file__).parent / "models").glob("*.py")))  # the model


def get_config(model: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = load_file(str(Path(__file__).parent / "models" / f"{model}.py"))  # the architecture of checkpoint=random
    c.checkpoint = ""  # a Hugging Face checkpoint directory, or "random" for random weights of c.model
    c.text = ""  # route this text; else random tokens
    c.tokenizer = ""  # a directory with tokenizer.json; default: the checkpoint's, else bytes
    c.seed = 0
    c.batch_size = 8
    c.seq_len = 128
    c.top_experts = 4  # experts listed per layer
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))
    return c

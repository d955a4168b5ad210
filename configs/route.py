"""`esft route`: run one batch through a model and print how each MoE layer routes it.

    esft route --config configs/route.py:tiny
    esft route --config configs/route.py --config.checkpoint=/path/to/hf_dir --config.text="Hello"
    esft route --config configs/route.py:tiny --config.mesh.data=2 --config.mesh.expert=4
With checkpoint="random" c.model is the random weights' architecture; with a checkpoint only its
runtime fields (dtype, moe_strategy, ...) apply and overriding another is an error
(esft_jax/app/config_blocks.py).
"""

import ml_collections

from esft_jax.app import config_blocks as blocks

PRESETS = blocks.MODELS  # the model


def get_config(model: str = "tiny") -> ml_collections.ConfigDict:
    c = blocks.model_source(ml_collections.ConfigDict(), model)
    c.text = ""  # route this text; else random tokens
    c.seed = 0
    c.batch_size = 8
    c.seq_len = 128
    c.top_experts = 4  # experts listed per layer
    c.mesh = blocks.mesh()
    return c

"""`esft plan`: per-device memory of one train step, per method and mesh, from the compiled program.

    esft plan --config configs/plan.py                                  # DeepSeek-V2-Lite, 1/2/4/8 devices
    esft plan --config configs/plan.py --config.checkpoint=/models/X    # a checkpoint's config.json
    esft plan --config configs/plan.py --config.methods=esft --config.expert_config=runs/intent/token.json
    esft plan --config configs/plan.py --config.topology=v5p:2x2x2 \
        --config.device_memory_gb=95                                    # needs libtpu
    esft plan --config configs/plan.py --config.micro_batch=0             # all 32 rows at once
Nothing is allocated: the step is lowered with abstract arrays on simulated CPU devices, or compiled
for a TPU slice's chips (no TPU attached) when a topology is named. With a checkpoint only c.model's runtime
fields apply (esft_jax/app/config_blocks.py).
"""

from pathlib import Path

import ml_collections

from esft_jax.app import config_blocks as blocks
from esft_jax.app.config_files import load_file

PRESETS = blocks.MODELS  # the model


def get_config(model: str = "deepseek_v2_lite") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = blocks.model(model)
    # what one would train a large model with: layer remat, attention that never holds the
    # scores (the memory of a flash kernel; on GPU esft train would take dot_product's cuDNN one)
    c.model.remat = True
    c.model.attention_impl = "blockwise"
    # else: a Hugging Face directory to plan from its config.json (runtime fields: c.model)
    c.checkpoint = ""
    c.methods = "fft,lora,esft"
    c.expert_fraction = 0.1  # esft, esft_lora: this share of each layer's experts ...
    c.expert_config = ""  # ... unless an expert config names them
    c.lora_rank = 8  # lora, esft_lora
    c.devices = (1, 2, 4, 8)
    c.topology = ""  # a TPU slice ("v5e:2x2", "v5p:2x2x2") to compile for with libtpu, instead of CPU devices
    c.mesh_axis = "fsdp"  # the mesh axis the devices form: fsdp (params and batch split) or expert
    c.batch_size = 32  # packed rows per optimizer step (the paper's 32 x 4096)
    # rows per device per micro-batch, accumulated to batch_size (esft train's grad_accum):
    # on n devices micro-batches of n * micro_batch rows; 0: the whole batch at once
    c.micro_batch = 1
    c.seq_len = 0  # 0: 4096 (the paper's), or the model's positions where it has fewer
    c.device_memory_gb = 80.0
    c.optim = load_file(str(Path(__file__).with_name("train.py"))).optim
    return c

"""`esft train`: fine-tune with ESFT (selected experts only), FFT, LoRA, LoRA on the selected experts
or the routers only.

    esft train --config configs/train.py:esft --config.checkpoint=/models/ESFT-vanilla-lite \
        --config.expert_config=runs/intent/token.json --config.data.train=data/builtin/train/intent.jsonl
    esft train --config configs/train.py:fft ...      esft train --config configs/train.py:lora ...
    esft train --config configs/train.py:esft_lora --config.expert_config=... ...
                                                      (LoRA factors on the selected experts only)
    esft train --config configs/train.py:router ...   (router-only tuning: every MoE layer's router)
    esft train --config configs/train.py:router_densemixer ...   (the same, the routers' gradient from
        the dense mixture over every expert: DenseMixer, --config.densemixer=True)
Rerunning the same command resumes from <workdir>/checkpoints (settings that change the result must
match the saved run's; see esft_jax/app/resume.py). Outputs in <workdir>: config.json,
metrics.jsonl, checkpoints/, adapter/ (the changed tensors), summary.json.
With checkpoint="random" c.model is the random weights' architecture; with a checkpoint only its
runtime fields (dtype, moe_strategy, ...) apply and overriding another is an error
(esft_jax/app/config_blocks.py).
"""

import ml_collections

from esft_jax.app import config_blocks as blocks

# the training method (esft_jax/train/method.py REGISTRY); METHOD_densemixer: with densemixer=True
PRESETS = (
    "esft",
    "fft",
    "lora",
    "router",
    "esft_lora",
    "router_densemixer",
)


def get_config(preset: str = "esft") -> ml_collections.ConfigDict:
    method = preset.removesuffix("_densemixer")
    c = ml_collections.ConfigDict()
    # "esft", "fft", "lora", "esft_lora" (LoRA on the selected experts) or "router" (router-only)
    c.method = method
    blocks.model_source(c)
    c.expert_config = ""  # esft, esft_lora: the expert config JSON (esft select)
    # the router's gradient from the dense mixture over every expert, the forward pass unchanged
    # (DenseMixer; esft_jax/model/router_grad.py): for a method that trains the router (router,
    # fft, esft with non_expert_modules)
    c.densemixer = preset.endswith("_densemixer")
    # lora and esft_lora: rank and alpha; targets: lora's (esft_lora's are the selected experts)
    c.lora = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, targets="attention,experts"))
    c.data = ml_collections.ConfigDict(
        dict(
            train="",  # a dataset file or folder (README: Your own data)
            general="",  # optional second (general / alignment) dataset mixed in
            format="auto",  # of both: auto (each by extension or folder), jsonl, json, parquet, arrow
            # conversations' format: "model" (the checkpoint's chat template, else ESFT's), "esft"
            # (ESFT's official one) or a PATH.jinja (esft_jax/data/chat.py)
            template="model",
            loss_on="assistant",  # trained tokens: "assistant" turns, "last_assistant", "all"
            general_ratio=1.0,  # general samples per task sample
            seq_len=0,  # packed row length; 0: 4096 (the paper's), or the model's positions if fewer
            validation_fraction=0.02,
            max_validation=256,
            shards=0,  # the global batch = this many shards, each read by the processes holding its rows
            # (0: one per block of rows a process holds); fixed, any process count reads the same data
            skip_invalid=False,
            limit=0,  # train on this many samples (the first after the validation split); 0: all
        )
    )
    c.seed = 0
    c.steps = 500
    # Resuming with more steps: True keeps the saved LR schedule (the extra steps run at its final lr).
    c.extend = False
    c.batch_size = 32  # packed rows per optimizer step (per micro-batch when grad_accum > 1)
    c.grad_accum = 1
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-5,
            schedule="cosine",
            warmup_steps=10,
            end_lr_fraction=0.1,
            steps=c.get_ref("steps"),
            adam_b1=0.9,
            adam_b2=0.95,
            adam_eps=1e-8,
            weight_decay=0.0,
            grad_clip=1.0,
        )
    )
    c.aux_loss_alpha = 0.0  # load-balancing loss weight (pretraining); ESFT/FFT fine-tuning: 0
    c.log_every = 10
    c.eval_every = 100
    # esft with a selected expert config: the trained adapter's coverage on this many prompt tokens
    # of the task data becomes its routing profile, what `esft serve`'s monitor compares requests
    # with (esft_jax/train/routing_profile.py); 0 keeps the selection's profile
    c.profile_tokens = 16384
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.workdir = f"runs/train_{preset}"
    c.mesh = blocks.mesh()
    c.distributed = blocks.distributed()
    return c

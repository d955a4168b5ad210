"""The blocks several config files (configs/) share, each defined once (big_vision's configs/common.py).

A config file calls these to add a block's fields; the keys and defaults are the contract the
commands read (esft_jax/runtime.py: model, checkpoint, tokenizer, mesh, distributed; the study's
selections and scoring: esft_jax/app/commands/run.py).

The model contract (`model_source`): with `checkpoint="random"`, `model` is the architecture of the
random weights and every field of it applies. With a Hugging Face checkpoint the architecture comes
from the checkpoint's config.json and only the runtime fields of `model` apply
(runtime.RUNTIME_FIELDS: dtype, moe_strategy, capacity_factor, expert_parallel, scan_layers, remat,
attention_impl, attention_block, frozen_dtype, router_grad);
overriding any other `model` field then is an error (checks.model_overrides), not ignored.
"""

from __future__ import annotations

import ml_collections

from esft_jax.app import config_files

# configs/models/
MODELS = tuple(sorted(p.stem for p in (config_files.bundled_dir() / "models").glob("*.py")))


# What a configs/models/ preset need not set: the runtime fields (app/runtime.py RUNTIME_FIELDS, which
# apply to a checkpoint's model too) at the values most presets run with, and the quantised layout
# (`expert_fp8_block` / `expert_mxfp4`: routed experts held in FP8 with blocks of that size, or in
# MXFP4, model/quant.py; () / False = in param_dtype; `linear_fp8`: the other linear weights in FP8
# too). A preset sets only what it changes (tiny: float32, a loop over its 4 layers).
PRESET_DEFAULTS = dict(
    dtype="bfloat16",
    moe_strategy="auto",
    capacity_factor=None,
    expert_parallel="psum",
    scan_layers=True,
    remat=False,
    attention_impl="reference",  # or "dot_product", "blockwise" (model/attention.py)
    attention_block=512,  # blockwise: queries and keys per block
    frozen_dtype="bfloat16",  # a checkpoint's FP8 / MXFP4 experts: "native" keeps them so
    router_grad="sparse",  # "dense": DenseMixer's router gradient (model/router_grad.py)
    expert_fp8_block=(),
    expert_mxfp4=False,
    linear_fp8=False,
)


def model(name: str) -> ml_collections.ConfigDict:
    """configs/models/<name>.py: an architecture (the fields of esft_jax.model.ModelConfig), with
    PRESET_DEFAULTS where the preset does not set them."""
    cd = config_files.load_file(str(config_files.bundled_dir() / "models" / f"{name}.py"))
    for key, value in PRESET_DEFAULTS.items():
        if key not in cd:
            cd[key] = value
    return cd


def model_source(c: ml_collections.ConfigDict, name: str = "tiny") -> ml_collections.ConfigDict:
    """Add where the weights come from: `model` (configs/models/<name>.py; see the module docstring
    for which of its fields apply), `checkpoint` (a Hugging Face directory, or "random" for seeded
    random weights of `model`) and `tokenizer` (a directory with tokenizer.json; default: the
    checkpoint's, else bytes). Returns `c`."""
    c.model = model(name)
    c.checkpoint = ""
    c.tokenizer = ""
    return c


def launch(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """How `esft run` runs its training variants (app/launch.py): `launch` "local" (one at a time on
    every device, or with `variant_devices` > 0 side by side, each on that many), "slurm" (a
    submitit job each, with `slurm`'s settings; cluster "local" runs them on this machine) or
    "print" (print each `esft train` command and stop). Returns `c`."""
    c.launch = "local"
    c.variant_devices = 0
    # submitit's executor parameters ("" / 0: not set); folder "": <run_dir>/slurm
    c.slurm = ml_collections.ConfigDict(
        dict(
            cluster="slurm",
            folder="",
            timeout_min=60,
            nodes=1,
            gpus_per_node=0,
            cpus_per_task=0,
            mem_gb=0,
            slurm_partition="",
        )
    )
    return c


def mesh() -> ml_collections.ConfigDict:
    """Mesh axis sizes over all processes' devices (esft_jax/sharding.py names the axes)."""
    return ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))


def distributed() -> ml_collections.ConfigDict:
    """Multi-process: num_processes > 1 with coordinator "host:port" and process_id, or -1 (auto-detect)."""
    return ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0))


def judge(**fields) -> ml_collections.ConfigDict:
    """An OpenAI-compatible judge endpoint (esft_jax/eval/judge.py); none while base_url is ""."""
    return ml_collections.ConfigDict(
        dict(base_url="", model="", api_key_env="OPENAI_API_KEY", **fields)
    )


def selection(
    score: str = "token",
    p: float = 0.2,
    method: str = "threshold",
    *,
    decimals=None,
    n: int = 1,
    group_size: int = 1,
    grouping: str = "coactivation",
    shared_experts: bool = False,
    non_expert_modules: bool = False,
    shared_only: bool = False,
) -> ml_collections.ConfigDict:
    """One expert selection (esft_jax/routing/select.py; decimals: round scores, None: exact) and
    the flags of the expert config it writes (shared_only: no routed experts at all)."""
    return ml_collections.ConfigDict(
        dict(
            score=score,
            norm="pooled",
            decimals=decimals,
            p=p,
            method=method,
            n=n,
            group_size=group_size,
            grouping=grouping,
            shared_experts=shared_experts,
            non_expert_modules=non_expert_modules,
            shared_only=shared_only,
        )
    )


def scoring(scorer: str, max_new_tokens: int, stop: str = "") -> ml_collections.ConfigDict:
    """How a task is scored: a scorer of esft_jax/eval/scorers.py or "judge"; stop strings split by "|"."""
    return ml_collections.ConfigDict(dict(scorer=scorer, max_new_tokens=max_new_tokens, stop=stop))

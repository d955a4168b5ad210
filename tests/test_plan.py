"""`esft plan`: memory of a compiled train step from abstract arrays, per device."""

import re

import jax
import pytest

from esft_jax.app import cli
from esft_jax.app.commands import plan as plan_command
from esft_jax.model import ModelConfig
from esft_jax.train import plan
from esft_jax.train.method import build_method
from esft_jax.train.optimizer import Optim
from esft_jax.train.settings import MethodSettings

CFG = ModelConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_shared_experts=1,
)
OPTIM = Optim(
    lr=1e-3,
    schedule="cosine",
    warmup_steps=1,
    end_lr_fraction=0.1,
    steps=10,
    adam_b1=0.9,
    adam_b2=0.95,
    adam_eps=1e-8,
    weight_decay=0.0,
    grad_clip=1.0,
)


def _n_params(cfg):
    from esft_jax.model.params import abstract_params

    return sum(x.size for x in jax.tree.leaves(abstract_params(cfg)))


def test_plan_counts_what_each_method_holds():
    fft = plan.estimate(
        CFG,
        build_method("fft", MethodSettings(), CFG),
        {"data": 1},
        batch_size=2,
        seq_len=32,
        optim=OPTIM,
    )
    n = _n_params(CFG)
    assert fft.params == fft.trainable == 4 * n  # float32 model and its trained copy
    assert 0 < fft.optimizer - 2 * 4 * n <= 16  # Adam's two moments and step counters
    assert fft.total >= fft.params + fft.trainable + fft.optimizer and fft.temporaries > 0
    esft = plan.estimate(
        CFG,
        build_method("esft", MethodSettings(expert_fraction=0.25), CFG),
        {"data": 1},
        batch_size=2,
        seq_len=32,
        optim=OPTIM,
    )
    rows = 2 * 4  # two MoE layers x 4 of 16 experts
    assert esft.trainable == rows * 3 * CFG.hidden_size * CFG.moe_intermediate_size * 4
    assert 0 < esft.optimizer - 2 * esft.trainable <= 16
    assert esft.total < fft.total


def test_every_method_plans_through_the_train_factory():
    lora = build_method("lora", MethodSettings(lora_rank=4), CFG)
    assert (lora.rank, lora.alpha) == (4, cli.config_files.load_file("configs/train.py").lora.alpha)
    router = plan.estimate(
        CFG,
        build_method("router", MethodSettings(), CFG),
        {"data": 1},
        batch_size=2,
        seq_len=32,
        optim=OPTIM,
    )
    # float32
    assert router.trainable == CFG.num_moe_layers * CFG.hidden_size * CFG.n_routed_experts * 4
    assert 0 < router.optimizer - 2 * router.trainable <= 16
    plan_command.check(cli.config_files.load("configs/plan.py", ["methods=router,esft"]))
    with pytest.raises(ValueError, match="expected one of"):
        build_method("bogus", MethodSettings(), CFG)


def test_accumulation_plans_the_step_at_its_micro_batch():
    """grad_accum micro-batches of B rows: the step scans them (app/commands/train.py), so it needs one
    micro-batch's temporaries and the gradient accumulator, not those of grad_accum * B rows."""
    method = build_method("esft", MethodSettings(expert_fraction=0.25), CFG)

    def estimate(batch_size, grad_accum):
        return plan.estimate(
            CFG,
            method,
            {"fsdp": 1},
            batch_size=batch_size,
            seq_len=128,
            optim=OPTIM,
            grad_accum=grad_accum,
        )

    large, accumulated, micro = estimate(8, 1), estimate(1, 8), estimate(1, 1)
    assert accumulated.temporaries < large.temporaries / 4
    batches = 4 * 8 * 128 * 4  # the input: four int32 arrays [8, 1, 128]
    assert accumulated.temporaries <= micro.temporaries + 2 * accumulated.trainable + batches


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
def test_fsdp_splits_params_and_optimizer_per_device():
    one = plan.estimate(
        CFG,
        build_method("fft", MethodSettings(), CFG),
        {"fsdp": 1},
        batch_size=4,
        seq_len=32,
        optim=OPTIM,
    )
    four = plan.estimate(
        CFG,
        build_method("fft", MethodSettings(), CFG),
        {"fsdp": 4},
        batch_size=4,
        seq_len=32,
        optim=OPTIM,
    )
    assert four.params < one.params / 2 and four.optimizer < one.optimizer / 2
    assert four.total < one.total


def test_a_bf16_plan_holds_no_float32_copy_of_the_frozen_expert_stacks(monkeypatch):
    """XLA:CPU computes bf16 dots in float32 and would hoist the convert of each frozen stacked
    weight out of the layer scan (a whole float32 copy, which a GPU/TPU compiler never makes); the
    plan compiles without that pass. Seen in the compiled program: a float32 stack made straight from
    a frozen parameter."""
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16", num_hidden_layers=4)
    method = build_method("esft", MethodSettings(expert_fraction=0.25), cfg)
    stacks = {  # gate, up [L, E, d, f] and down [L, E, f, d]
        f"f32[{cfg.num_moe_layers},{cfg.n_routed_experts},{a},{b}]"
        for a, b in [(cfg.hidden_size, cfg.moe_intermediate_size)] * 2
    } | {
        f"f32[{cfg.num_moe_layers},{cfg.n_routed_experts},{cfg.moe_intermediate_size},{cfg.hidden_size}]"
    }

    def hoisted() -> int:
        compiled = plan.lower_train_step(
            cfg, method, {"fsdp": 1}, batch_size=2, seq_len=32, optim=OPTIM
        )[0]
        copies = re.findall(r"= (f32\[[\d,]+\])\S* (?:fusion|convert)\(%frozen", compiled.as_text())
        return sum(c in stacks for c in copies)

    assert hoisted() == 0
    monkeypatch.setattr(plan, "CPU_ONLY", {})  # XLA:CPU's defaults: the check sees the copies
    assert hoisted() == 3


def test_esft_plan_command_prints_a_table(capsys):
    c = cli.config_files.load(
        "configs/plan.py",
        ["devices=(1,)", "methods=esft,fft", "batch_size=2", "seq_len=16", "micro_batch=1"],
    )
    for key, value in dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        rope_type="default",
    ).items():
        c.model[key] = value
    plan_command.run(c)
    out = capsys.readouterr().out
    assert "| esft | 1 |" in out and "| fft | 1 |" in out
    assert "without while-loop-invariant-code-motion" in out  # what it compiled for
    assert "esft: fits on 1 device(s)" in out
    assert "| 1 x 2 |" in out  # the command plans what it was given: 2 micro-batches of 1 row
    assert "MiB per device" in out  # a model under a GiB is shown in MiB, not as 0.00 GiB


def test_the_step_batch_is_split_into_micro_batches_per_device():
    assert plan.micro_batches(32, 1, 1) == (1, 32)  # the paper's batch on one device
    assert plan.micro_batches(32, 1, 8) == (8, 4)
    assert plan.micro_batches(32, 2, 4) == (8, 4)
    assert plan.micro_batches(32, 0, 4) == (32, 1)  # all at once
    with pytest.raises(plan.PlanError, match="not a multiple of 3 devices"):
        plan.micro_batches(32, 1, 3)


def test_a_tpu_slice_is_planned_by_the_tpu_compiler():
    pytest.importorskip(
        "libtpu", reason="TPU ahead-of-time compilation needs libtpu (pip install 'jax[tpu]')"
    )
    chips = plan.tpu_devices("v5e:2x2")
    assert len(chips) == 4 and chips[0].platform == "tpu"
    fft = plan.estimate(
        CFG,
        build_method("fft", MethodSettings(), CFG),
        {"fsdp": 4},
        batch_size=4,
        seq_len=512,
        optim=OPTIM,
        devices=chips,
    )
    n = _n_params(CFG)
    assert fft.params < 4 * n / 2 and fft.optimizer < 2 * 4 * n / 2  # split over the 4 chips
    assert fft.total >= fft.params + fft.trainable + fft.optimizer and fft.temporaries > 0
    # a step too big for a chip's HBM: the TPU compiler refuses it and says how much it would need
    huge = plan.estimate(
        CFG,
        build_method("fft", MethodSettings(), CFG),
        {"fsdp": 1},
        batch_size=64,
        seq_len=8192,
        optim=OPTIM,
        devices=chips,
    )
    assert huge.out_of_memory and huge.temporaries > 16e9 and huge.total > huge.temporaries
    with pytest.raises(plan.PlanError, match="v5e:2x2 has 4 chips"):
        plan.report(
            CFG,
            ["fft"],
            (8,),
            "fsdp",
            batch_size=4,
            seq_len=32,
            optim=OPTIM,
            device_memory_gb=16,
            topology="v5e:2x2",
        )


def test_a_tpu_slice_without_libtpu_is_a_clear_error():
    try:
        import libtpu  # noqa: F401

        pytest.skip("libtpu is installed")
    except ImportError:
        pass
    with pytest.raises(plan.PlanError, match="needs libtpu"):
        plan.tpu_devices("v5e:2x2")

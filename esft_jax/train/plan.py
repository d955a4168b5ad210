"""Memory planning: lower and compile the real train step with abstract, sharded arguments (no weights
allocated) and read the compiled executable's memory analysis, per device.

Works on simulated CPU devices (`esft plan` sets --xla_force_host_platform_device_count itself), so a
laptop can say how many accelerators a method needs. The numbers are XLA:CPU's buffer assignment for the
same program, compiled without the CPU-only rewrite that would dominate it (`CPU_ONLY`); an
accelerator's compiler fuses differently, so treat temporaries as an estimate. With libtpu installed the
step compiles for a TPU topology instead (`tpu_devices`), no TPU attached: the numbers are then the TPU
compiler's own.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from esft_jax import sharding
from esft_jax.errors import UserError
from esft_jax.model import ModelConfig
from esft_jax.model.experts import resolve_strategy
from esft_jax.model.params import abstract_params, param_axes
from esft_jax.train.method import TrainingMethod, build_method
from esft_jax.train.optimizer import Optim, learning_rate, make_optimizer
from esft_jax.train.settings import MethodSettings
from esft_jax.train.step import make_train_step

GIB = 1024**3
# XLA:CPU computes bf16 dots in float32, and its while-loop-invariant code motion then hoists the
# convert of every frozen stacked weight out of the layer scan: float32 copies of whole expert stacks
# (53.6 GiB of DeepSeek-V2-Lite's ESFT step) that a GPU/TPU compiler, keeping bf16 dots, never makes.
# A plan compiled on CPU leaves that pass out: against libtpu's plan of the same step (V2-Lite ESFT,
# bf16, batch 2 x 4096, one device) its total went from +76% to +6% (docs/benchmarks.md).
CPU_ONLY = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device (the largest shard when shards differ)."""

    mesh: dict[str, int]
    params: int  # the model as loaded (frozen copy)
    trainable: int  # the trained copy (float32 master weights / expert rows / LoRA factors)
    optimizer: int
    # activations, gradients, workspace: the compiled step's temp buffers
    temporaries: int
    # what the step needs resident: arguments + outputs not aliased to them + temporaries
    total: int
    compile_seconds: float
    # the compiler refused it (then temporaries is its figure, total a lower bound)
    out_of_memory: bool = False


def _per_device(tree: Any) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class PlanError(UserError, ValueError):
    """A plan that cannot be made here (e.g. a TPU topology without libtpu)."""


class OutOfMemory(Exception):
    """The target's compiler refused the step for want of device memory (TPU compilers check)."""

    def __init__(self, message: str, arguments: tuple, seconds: float):
        super().__init__(message)
        self.arguments, self.seconds = arguments, seconds
        # the compiler's own figure where it gives one: "... required for HLO temporaries (297.49G) ..."
        found = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        self.temporaries = int(float(found[1]) * scale[found[2]]) if found else 0


def tpu_devices(topology: str) -> list:
    """The devices of a TPU slice, e.g. "v5e:2x2" or "v5p:2x2x1", for compiling ahead of time without
    one: needs libtpu (pip install "jax[tpu]") and nothing else. Off a TPU VM, libtpu prints warnings
    about the host's metadata; they are harmless here."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # jax raises RuntimeError / ValueError / XlaRuntimeError, by version
        raise PlanError(
            f"--config.topology={topology}: cannot describe this TPU slice ({str(e).splitlines()[0]}); "
            "it needs libtpu: pip install 'jax[tpu]'"
        ) from e


def lower_train_step(
    cfg: ModelConfig,
    method: TrainingMethod,
    mesh_shape: dict[str, int],
    *,
    batch_size: int,
    seq_len: int,
    optim: Optim,
    devices: list | None = None,
    grad_accum: int = 1,
):
    """(compiled train step, its abstract sharded arguments (state, frozen, batch), compile seconds), on
    the first devices of `devices` (default: jax.devices()). The step is the one `esft train` runs
    (make_train_step): it takes `grad_accum` micro-batches of `batch_size` rows and accumulates
    their gradients (a scan over them when more than one), as --config.grad_accum asks."""
    n = math.prod(mesh_shape.values())
    mesh = sharding.make_mesh(mesh_shape, (devices or jax.devices())[:n])
    platform = mesh.devices.flat[0].platform
    # the MoE strategy the target would pick ("auto" means the backend that runs, not the one tracing)
    quantized = cfg.expert_scheme is not None
    strategy = resolve_strategy(cfg.moe_strategy, platform, quantized)
    cfg = dataclasses.replace(cfg, moe_strategy=strategy)
    axes = param_axes(cfg)
    frozen = _abstract(abstract_params(cfg), sharding.param_shardings(axes, mesh))
    trainable_shape = jax.eval_shape(method.init, frozen)
    trainable_shardings = sharding.param_shardings(method.axes(axes, trainable_shape), mesh)
    trainable = _abstract(trainable_shape, trainable_shardings)
    tx, schedule = make_optimizer(optim), learning_rate(optim)
    replicated = NamedSharding(mesh, jax.P())
    # optimizer moments are sharded like the parameters they belong to; counters are replicated
    opt_state = optax.tree_map_params(
        tx,
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(tx.init, trainable),
        trainable_shardings,
        transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    )
    state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "trainable": trainable,
        "opt_state": opt_state,
    }
    batch_spec = NamedSharding(
        mesh, sharding.logical_to_spec((None, "act_batch", None), dict(mesh.shape))
    )
    batch = {
        k: jax.ShapeDtypeStruct((grad_accum, batch_size, seq_len), np.int32, sharding=batch_spec)
        for k in ("tokens", "segment_ids", "positions", "loss_mask")
    }
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = make_train_step(method, cfg, tx, schedule).lower(state, frozen, batch)
        try:
            compiled = lowered.compile(compiler_options=CPU_ONLY if platform == "cpu" else None)
        except (
            jax.errors.JaxRuntimeError
        ) as e:  # an accelerator's compiler checks its device memory
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise OutOfMemory(str(e), (state, frozen, batch), time.perf_counter() - start) from e
    return compiled, (state, frozen, batch), time.perf_counter() - start


def estimate(
    cfg: ModelConfig,
    method: TrainingMethod,
    mesh_shape: dict[str, int],
    *,
    batch_size: int,
    seq_len: int,
    optim: Optim,
    devices: list | None = None,
    grad_accum: int = 1,
) -> Plan:
    """Compile one train step of `method` (grad_accum micro-batches of batch_size rows) on a mesh
    of simulated, real or TPU-topology devices; read its memory."""
    try:
        compiled, arguments, seconds = lower_train_step(
            cfg,
            method,
            mesh_shape,
            batch_size=batch_size,
            seq_len=seq_len,
            optim=optim,
            devices=devices,
            grad_accum=grad_accum,
        )
        temporaries, total = (
            int(compiled.memory_analysis().temp_size_in_bytes),
            resident_bytes(compiled),
        )
    except OutOfMemory as e:  # total: a lower bound, what is held plus the compiler's temporaries
        arguments, seconds, temporaries, total = e.arguments, e.seconds, e.temporaries, None
    state, frozen, _ = arguments
    held = [_per_device(frozen), _per_device(state["trainable"]), _per_device(state["opt_state"])]
    return Plan(
        dict(mesh_shape),
        *held,
        temporaries,
        sum(held) + temporaries if total is None else total,
        seconds,
        out_of_memory=total is None,
    )


def resident_bytes(compiled) -> int:
    """What a compiled executable needs resident per device: arguments, outputs not aliased to them
    (donated state is updated in place), temporaries."""
    mem = compiled.memory_analysis()
    return int(
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )


def compiled_for(topology: str = "") -> str:
    """What the plan's numbers come from, for its output."""
    if topology:
        return f"{topology} (the TPU compiler, libtpu)"
    backend = jax.default_backend()
    if backend != "cpu":
        return backend
    return (
        "CPU devices (XLA:CPU without while-loop-invariant-code-motion: no hoisted "
        "float32 copies of bf16 weight stacks, which GPU/TPU compilers do not make)"
    )


def micro_batches(batch_size: int, micro_batch: int, n: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per step) of a step of batch_size rows on n devices:
    micro_batch rows per device at a time (0: the whole batch at once)."""
    if not micro_batch:
        return batch_size, 1
    rows = n * micro_batch
    if batch_size % rows:
        raise PlanError(
            f"--config.batch_size={batch_size}: not a multiple of {n} devices x "
            f"--config.micro_batch={micro_batch}"
        )
    return rows, batch_size // rows


def layer_inputs(cfg: ModelConfig, rows_per_device: int, seq_len: int) -> int | None:
    """Bytes of the activations a remat step keeps for its backward pass, per device: every layer's
    input [L, B, T, d] in the compute dtype (part of the temporaries). None without remat."""
    if not cfg.remat:
        return None
    itemsize = jnp.dtype(cfg.dtype).itemsize
    return cfg.num_hidden_layers * rows_per_device * seq_len * cfg.hidden_size * itemsize


def report(
    cfg: ModelConfig,
    methods: list[str],
    devices: tuple[int, ...],
    mesh_axis: str,
    *,
    batch_size: int,
    seq_len: int,
    optim: Optim,
    device_memory_gb: float,
    topology: str = "",
    micro_batch: int = 0,
    settings: MethodSettings | None = None,
) -> str:
    """A markdown table of plans (GiB per device) for each method x device count on a 1-axis mesh,
    and the smallest device count on which each method fits `device_memory_gb`; compiled for the TPU
    slice `topology` if given (its first n chips). Each optimizer step takes batch_size rows,
    micro_batch rows per device at a time (0: all at once)."""
    from esft_jax.report import markdown_table

    targets = tpu_devices(topology) if topology else None
    if targets is not None and max(devices) > len(targets):
        raise PlanError(
            f"--config.devices: {max(devices)} devices, but {topology} has {len(targets)} chips"
        )
    rows, smallest = [], {}
    for name in methods:
        method = build_method(name, settings or MethodSettings(), cfg)
        for n in devices:
            rows_at_once, accum = micro_batches(batch_size, micro_batch, n)
            p = estimate(
                cfg,
                method,
                {mesh_axis: n},
                batch_size=rows_at_once,
                seq_len=seq_len,
                optim=optim,
                devices=targets,
                grad_accum=accum,
            )
            # memory is sold in decimal GB
            fits = p.total <= device_memory_gb * 1e9 and not p.out_of_memory
            if fits:
                smallest.setdefault(name, n)
            kept = layer_inputs(cfg, max(rows_at_once // n, 1), seq_len)
            sizes = [p.params, p.trainable, p.optimizer, kept, p.temporaries, p.total]
            verdict = "yes" if fits else "no (compiler)" if p.out_of_memory else "no"
            step = f"{rows_at_once} x {accum}"
            rows.append([name, str(n), step, sizes, verdict, f"{p.compile_seconds:.0f}"])
    # GiB, or MiB for a model whose every plan is under a GiB
    unit, scale = ("GiB", GIB) if max(r[3][-1] for r in rows) >= GIB else ("MiB", 2**20)
    for r in rows:
        r[3:4] = ["-" if b is None else f"{b / scale:.2f}" for b in r[3]]
    head = [
        "method",
        "devices",
        "rows x micro-batches",
        "params",
        "trainable",
        "optimizer",
        "activations",
        "temporaries",
        "total",
        f"fits {device_memory_gb:g} GB ({device_memory_gb * 1e9 / GIB:.1f} GiB)",
        "compile s",
    ]
    lines = [
        f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts, "
        f"hidden {cfg.hidden_size}, {cfg.dtype}"
        + _quantized(cfg)
        + f"; batch {batch_size} x {seq_len} a step, "
        f"remat={cfg.remat}, attention_impl={cfg.attention_impl}; {unit} per device, mesh axis "
        f"{mesh_axis}, compiled for {compiled_for(topology)}. params: the frozen model; trainable: "
        "the trained copy; activations: the layer inputs kept for the backward pass (part of the "
        "temporaries)",
        markdown_table(head, rows).rstrip(),
    ]
    lines += [
        f"{name}: "
        + (
            f"fits on {smallest[name]} device(s)"
            if name in smallest
            else f"does not fit on {max(devices)} devices"
        )
        for name in methods
    ]
    return "\n".join(lines)


def _quantized(cfg: ModelConfig) -> str:
    """What the frozen model holds quantised, for the table's heading."""
    if cfg.expert_scheme is None:
        return ""
    linears = ", attention and dense/shared MLPs too" if cfg.linear_fp8 else ""
    return f" (routed experts {cfg.expert_scheme.label}{linears})"

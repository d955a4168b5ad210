"""Routed experts kept in fine-grained FP8 on the device, dequantised one expert at a time.

DeepSeek-V3, Kimi K2, Moonlight and Qwen3-MoE-FP8 ship their expert matrices as FP8 (E4M3) with one
float32 scale per block. A frozen expert stack can stay so (`ModelConfig.expert_fp8_block`): the
matrix `name` [E, in, out] (our layout, the transpose of the file's [out, in]) is float8_e4m3fn,
and `name + SCALE` [E, ceil(in/bi), ceil(out/bo)] float32 holds its blocks' scales. An expert's
value is the float32 product of its FP8 value and its block's scale, rounded to bfloat16:
transformers' `Fp8Dequantize`, so a quantised stack computes what the same stack dequantised up
front computes. Half the bytes of bf16, and the blocked MoE path never holds more than one
expert's dequantised matrix (`Fp8Stack`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

SCALE = "_scale"  # the scales of `name` are `name + SCALE`
QUANTIZED = ("gate", "up", "down")  # the expert matrices that can be FP8 (biases never are)
FP8 = "float8_e4m3fn"


def block_io(block: tuple[int, int]) -> tuple[int, int]:
    """The block in our [in, out] layout, from the file's [out, in] block (every expert matrix)."""
    return block[1], block[0]


def scale_shape(shape: tuple[int, ...], block_in_out: tuple[int, int]) -> tuple[int, ...]:
    """The scale grid [..., ceil(in/bi), ceil(out/bo)] of an [..., in, out] matrix."""
    bi, bo = block_in_out
    return (*shape[:-2], -(-shape[-2] // bi), -(-shape[-1] // bo))


def dequantize(
    values_io: jax.Array, scale_rc: jax.Array, block_in_out: tuple[int, int], dtype: Any
) -> jax.Array:
    """values [..., in, out] FP8, scale [..., R, C] -> [..., in, out] in `dtype`, by way of
    bfloat16: what transformers and a bf16 load of the checkpoint hold (checkpoint/hf.py)."""
    bi, bo = block_in_out
    n_in, n_out = values_io.shape[-2:]
    scale = jnp.repeat(jnp.repeat(scale_rc.astype(jnp.float32), bi, -2), bo, -1)
    product = values_io.astype(jnp.float32) * scale[..., :n_in, :n_out]
    return product.astype(jnp.bfloat16).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Fp8Stack:
    """An FP8 expert stack as the blocked MoE loop takes it: `stack[i]` is expert i dequantised."""

    values: jax.Array  # [E, in, out] float8_e4m3fn
    scale: jax.Array  # [E, ceil(in/bi), ceil(out/bo)] float32
    block: tuple[int, int]  # (bi, bo)
    dtype: str  # what an expert is dequantised to

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def __getitem__(self, i: jax.Array) -> jax.Array:
        return dequantize(self.values[i], self.scale[i], self.block, self.dtype)

    def dequantized(self) -> jax.Array:
        return dequantize(self.values, self.scale, self.block, self.dtype)


jax.tree_util.register_dataclass(
    Fp8Stack, data_fields=["values", "scale"], meta_fields=["block", "dtype"]
)


def is_quantized(experts: dict[str, jax.Array]) -> bool:
    return any(name + SCALE in experts for name in QUANTIZED)


def stacks(experts: dict[str, Any], block: tuple[int, int], dtype: Any) -> dict[str, Any]:
    """The experts' dict with each quantised matrix as one Fp8Stack (its scales folded in); the
    biases and unquantised matrices as they are."""
    out = {}
    for name, w in experts.items():
        if name.endswith(SCALE):
            continue
        if name + SCALE in experts:
            w = Fp8Stack(w, experts[name + SCALE], block_io(block), jnp.dtype(dtype).name)
        out[name] = w
    return out


def dequantize_experts(experts: dict[str, Any], block: tuple[int, int], dtype: Any) -> dict:
    """The experts' dict with every quantised matrix dequantised whole (the paths other than the
    blocked loop; a stack of one layer at a time inside the layer loop)."""
    return {
        name: w.dequantized() if isinstance(w, Fp8Stack) else w
        for name, w in stacks(experts, block, dtype).items()
    }


def rows(experts: dict[str, Any], index: Any, block: tuple[int, int], dtype: Any) -> dict:
    """Experts `experts[name][index]` of every matrix and bias (e.g. index = (layers, experts)
    arrays), quantised ones dequantised to `dtype`, the rest as they are: the trained copy of
    ESFT's selected experts."""
    out = {}
    for name, w in stacks(experts, block, dtype).items():
        if isinstance(w, Fp8Stack):
            out[name] = dequantize(w.values[index], w.scale[index], w.block, dtype)
        else:
            out[name] = w[index]
    return out


FP8_MAX = 448.0  # the largest float8_e4m3fn value


def quantize(w_io: jax.Array, block_in_out: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """w [..., in, out] -> (FP8 values, float32 scales [..., ceil(in/bi), ceil(out/bo)]): each
    block scaled so that its largest magnitude is FP8's largest (DeepSeek-V3's weight
    quantisation), the values rounded to nearest. An all-zero block gets scale 1."""
    bi, bo = block_in_out
    *lead, n_in, n_out = w_io.shape
    r, c = -(-n_in // bi), -(-n_out // bo)
    padded = jnp.pad(
        w_io.astype(jnp.float32),
        [(0, 0)] * len(lead) + [(0, r * bi - n_in), (0, c * bo - n_out)],
    )
    blocks = padded.reshape(*lead, r, bi, c, bo)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))  # [..., r, c]
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    values = (blocks / scale[..., :, None, :, None]).astype(FP8)
    return values.reshape(*lead, r * bi, c * bo)[..., :n_in, :n_out], scale

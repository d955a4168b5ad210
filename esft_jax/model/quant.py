"""Routed experts kept quantised on the device, dequantised one expert at a time.

Checkpoints ship their expert matrices quantised: DeepSeek-V3, Kimi K2 and Qwen3-MoE-FP8 in
fine-grained FP8 (E4M3 with one float32 scale per block), gpt-oss in MXFP4 (E2M1 pairs packed in a
byte, one power-of-two exponent per 32 inputs). A frozen expert stack can stay so
(`ModelConfig.expert_scheme`): the matrix `name` [E, in, out] (our layout, the transpose of the
file's [out, in]) is stored as the scheme's values, and `name + SCALE` holds its scales. An expert's
value is what a bf16 load of the checkpoint holds (transformers' dequantisation), so a quantised stack
computes what the same stack dequantised up front computes, at a half (FP8) or a quarter (MXFP4) of
the bytes, and the blocked MoE path never holds more than one expert's dequantised matrix
(`QuantStack`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

SCALE = "_scale"  # the scales of `name` are `name + SCALE`
QUANTIZED = ("gate", "up", "down")  # the expert matrices that can be quantised (biases never are)
FP8 = "float8_e4m3fn"
FP8_MAX = 448.0  # the largest float8_e4m3fn value


def block_io(block: tuple[int, int]) -> tuple[int, int]:
    """The block in our [in, out] layout, from the file's [out, in] block (every expert matrix)."""
    return block[1], block[0]


@dataclasses.dataclass(frozen=True)
class Fp8Blocks:
    """Fine-grained FP8: values [..., in, out] float8_e4m3fn, scales [..., ceil(in/bi), ceil(out/bo)]
    float32, one per (bi, bo) block of our layout."""

    block: tuple[int, int]  # (bi, bo)
    values_dtype: ClassVar[str] = FP8
    scale_dtype: ClassVar[str] = "float32"

    @property
    def label(self) -> str:
        return f"FP8 in {self.block[1]}x{self.block[0]} blocks"  # the file's [out, in] block

    def shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(values, scales) shapes of an [..., in, out] matrix."""
        bi, bo = self.block
        return shape, (*shape[:-2], -(-shape[-2] // bi), -(-shape[-1] // bo))

    def matrix_shape(self, values_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(values_shape)

    def dequantize(self, values: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
        """-> [..., in, out] in `dtype`, by way of bfloat16: what transformers' Fp8Dequantize and a
        bf16 load of the checkpoint hold (checkpoint/fp8.py)."""
        bi, bo = self.block
        n_in, n_out = values.shape[-2:]
        per_value = jnp.repeat(jnp.repeat(scale.astype(jnp.float32), bi, -2), bo, -1)
        product = values.astype(jnp.float32) * per_value[..., :n_in, :n_out]
        return product.astype(jnp.bfloat16).astype(dtype)

    def quantize(self, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        """w [..., in, out] -> (values, scales): each block scaled so that its largest magnitude is
        FP8's largest (DeepSeek-V3's weight quantisation), values rounded to nearest; an all-zero
        block gets scale 1."""
        bi, bo = self.block
        *lead, n_in, n_out = w.shape
        r, c = -(-n_in // bi), -(-n_out // bo)
        padded = jnp.pad(
            w.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, r * bi - n_in), (0, c * bo - n_out)]
        )
        blocks = padded.reshape(*lead, r, bi, c, bo)
        amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))  # [..., r, c]
        scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
        values = (blocks / scale[..., :, None, :, None]).astype(FP8)
        return values.reshape(*lead, r * bi, c * bo)[..., :n_in, :n_out], scale


# E2M1 code -> value: bit 3 is the sign, bits 0-2 index the magnitudes.
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_VALUES = FP4_MAGNITUDES + tuple(-m for m in FP4_MAGNITUDES)
E8M0_BIAS = 127


@dataclasses.dataclass(frozen=True)
class Mxfp4:
    """MXFP4 (OCP microscaling): values [..., in/2, out] uint8, each byte two E2M1 codes of
    consecutive inputs (the low nibble the even one); scales [..., in/32, out] uint8, one E8M0
    exponent (2^(s - 127)) per 32 consecutive inputs. gpt-oss's files hold the same bytes, transposed
    (checkpoint/mxfp4.py)."""

    block: ClassVar[int] = 32  # inputs per scale
    values_dtype: ClassVar[str] = "uint8"
    scale_dtype: ClassVar[str] = "uint8"
    label: ClassVar[str] = "MXFP4"

    def shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        *lead, n_in, n_out = shape
        if n_in % self.block:
            raise ValueError(f"MXFP4 needs an input width that is a multiple of 32, not {n_in}")
        return (*lead, n_in // 2, n_out), (*lead, n_in // self.block, n_out)

    def matrix_shape(self, values_shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, half_in, n_out = values_shape
        return (*lead, 2 * half_in, n_out)

    def dequantize(self, values: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
        """-> [..., in, out] in `dtype`: each FP4 value times its block's power of two, exact in
        float32 (transformers' convert_moe_packed_tensors, bit for bit)."""
        table = jnp.asarray(FP4_VALUES, jnp.float32)
        pairs = jnp.stack([table[values & 0x0F], table[values >> 4]], axis=-2)  # [.., in/2, 2, out]
        codes = pairs.reshape(self.matrix_shape(values.shape))
        exps = jnp.repeat(scale.astype(jnp.int32) - E8M0_BIAS, self.block, axis=-2)
        return jnp.ldexp(codes, exps).astype(dtype)

    def quantize(self, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        """w [..., in, out] -> (values, scales): each block of 32 inputs gets the smallest power of
        two that fits its largest magnitude within FP4's 6, each value rounded to the nearest E2M1
        value (ties to the even code): the inverse of `dequantize`."""
        *lead, n_in, n_out = w.shape
        self.shapes(w.shape)
        x = w.astype(jnp.float32).reshape(*lead, n_in // self.block, self.block, n_out)
        mant, exp = jnp.frexp(jnp.max(jnp.abs(x), axis=-2))  # amax = mant * 2^exp, mant in [.5, 1)
        exps = jnp.clip(
            exp - 3 + (mant > 0.75), -E8M0_BIAS, E8M0_BIAS
        )  # 6 * 2^(exp-3) = .75 * 2^exp
        codes = _nearest_fp4(jnp.ldexp(x, -exps[..., None, :])).reshape(*lead, n_in // 2, 2, n_out)
        values = codes[..., 0, :] | (codes[..., 1, :] << 4)
        return values, (exps + E8M0_BIAS).astype(jnp.uint8)


def _nearest_fp4(y: jax.Array) -> jax.Array:
    """E2M1 codes (uint8) nearest to y (|y| <= 6); a tie goes to the even code."""
    magnitudes = jnp.asarray(FP4_MAGNITUDES, jnp.float32)
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    mag = jnp.abs(y)
    idx = jnp.searchsorted(midpoints, mag, side="left")  # a tie lands on the lower neighbour
    tie = mag == midpoints[jnp.minimum(idx, len(FP4_MAGNITUDES) - 2)]
    idx = idx + (tie & (idx % 2 == 1))
    return (idx + 8 * jnp.signbit(y)).astype(jnp.uint8)


Scheme = Fp8Blocks | Mxfp4


def expert_scheme(fp8_block: tuple[int, ...], mxfp4: bool) -> Scheme | None:
    """The scheme of ModelConfig.expert_fp8_block (the file's [out, in] block) / expert_mxfp4."""
    if mxfp4:
        return Mxfp4()
    return Fp8Blocks(block_io(fp8_block)) if fp8_block else None


@dataclasses.dataclass(frozen=True)
class QuantStack:
    """A quantised expert stack as the MoE paths take it: `stack[i]` is expert i dequantised, and
    `shape` the dequantised stack's."""

    values: jax.Array
    scale: jax.Array
    scheme: Scheme
    dtype: str  # what an expert is dequantised to

    @property
    def shape(self) -> tuple[int, ...]:
        return self.scheme.matrix_shape(self.values.shape)

    def __getitem__(self, i: jax.Array) -> jax.Array:
        return self.scheme.dequantize(self.values[i], self.scale[i], self.dtype)

    def dequantized(self) -> jax.Array:
        return self.scheme.dequantize(self.values, self.scale, self.dtype)


jax.tree_util.register_dataclass(
    QuantStack, data_fields=["values", "scale"], meta_fields=["scheme", "dtype"]
)


def stacks(experts: dict[str, Any], scheme: Scheme | None, dtype: Any) -> dict[str, Any]:
    """The experts' dict with each quantised matrix as one QuantStack (its scales folded in); the
    biases and unquantised matrices as they are."""
    out = {}
    for name, w in experts.items():
        if name.endswith(SCALE):
            continue
        if scheme is not None and name + SCALE in experts:
            w = QuantStack(w, experts[name + SCALE], scheme, jnp.dtype(dtype).name)
        out[name] = w
    return out


def dequantize_experts(experts: dict[str, Any], scheme: Scheme | None, dtype: Any) -> dict:
    """The experts' dict with every quantised matrix dequantised whole (the paths other than the
    blocked loop; a stack of one layer at a time inside the layer loop)."""
    return {
        name: w.dequantized() if isinstance(w, QuantStack) else w
        for name, w in stacks(experts, scheme, dtype).items()
    }


def rows(experts: dict[str, Any], index: Any, scheme: Scheme | None, dtype: Any) -> dict:
    """Experts `experts[name][index]` of every matrix and bias (e.g. index = (layers, experts)
    arrays), quantised ones dequantised to `dtype`, the rest as they are: the trained copy of
    ESFT's selected experts."""
    out = {}
    for name, w in stacks(experts, scheme, dtype).items():
        if isinstance(w, QuantStack):
            out[name] = w.scheme.dequantize(w.values[index], w.scale[index], dtype)
        else:
            out[name] = w[index]
    return out

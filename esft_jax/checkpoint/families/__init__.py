"""Model families by Hugging Face `model_type`: one module each (see base.py for what one provides)."""

from __future__ import annotations

from esft_jax.checkpoint.families import (
    deepseek,
    glm4_moe,
    gpt_oss,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_moe,
)
from esft_jax.checkpoint.families.base import Family
from esft_jax.model.config import ConfigError

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        deepseek.V2,
        deepseek.V3,
        deepseek.KIMI_K2,
        qwen2_moe.FAMILY,
        qwen3_moe.FAMILY,
        olmoe.FAMILY,
        mixtral.FAMILY,
        glm4_moe.FAMILY,
        gpt_oss.FAMILY,
    )
}
MODEL_TYPES = tuple(FAMILIES)


def family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; expected one of {MODEL_TYPES}"
        )
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "MODEL_TYPES", "Family", "family"]

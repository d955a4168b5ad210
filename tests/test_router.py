"""The top-k weights of each DeepSeek family against its original code, written out in float64 NumPy:
V2 normalises *or* scales by routed_scaling_factor, V3 normalises *then* scales."""

import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_float32_close, roundings

from esft_jax.model import ModelConfig
from esft_jax.model.router import route


def _original_weights(x, w, k, norm, scale, v3):
    """DeepSeek's modeling code for the gate (softmax / sigmoid scores, greedy top-k)."""
    logits = x.astype(np.float64) @ w.astype(np.float64)
    scores = (
        1 / (1 + np.exp(-logits)) if v3 else np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    )
    top = np.sort(scores, axis=-1)[:, ::-1][:, :k]
    if v3:  # V3: normalise, then scale
        return (top / (top.sum(-1, keepdims=True) + 1e-20) if norm else top) * scale
    return top / (top.sum(-1, keepdims=True) + 1e-20) if norm and k > 1 else top * scale  # V2: or


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("norm", [False, True])
def test_topk_weights_follow_the_original_code(family, norm):
    v3 = family == "deepseek_v3"
    cfg = ModelConfig(
        model_type=family,
        hidden_size=16,
        n_routed_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=norm,
        routed_scaling_factor=2.5,
        scale_normalised_weights=v3,
        scoring_func="sigmoid" if v3 else "softmax",
        topk_method="noaux_tc" if v3 else "greedy",
        n_group=1 if v3 else None,
        topk_group=1 if v3 else None,
    )
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(32, 16)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    out = route(jnp.asarray(x), jnp.asarray(w), cfg)
    want = _original_weights(x, w, 3, norm, 2.5, v3)
    assert_float32_close(out.weights, want, roundings(2, 16))  # a 16-wide matmul, then the scores
    total = np.asarray(out.weights).sum(-1)
    assert np.allclose(total, 1.0) == (norm and not v3)  # only V2 keeps normalised weights unscaled

"""The router's gradient from the dense mixture over every expert (`cfg.router_grad="dense"`):
DenseMixer (Yao et al. 2025, github.com/yaof20/DenseMixer).

Top-k routing gives the router a gradient through the k chosen experts only. DenseMixer keeps the
forward pass (the sparse top-k mixture, bit for bit) and, in the backward pass, gives the router
the gradient of the dense mixture over all E experts, a straight-through estimate:

    y = y_sparse + (y_dense - stop_gradient(y_dense)),   y_dense[n] = sum_e w[n, e] * MLP_e(x[n]),

where y_dense carries gradient to the gate weights w only. The experts and the input x get theirs
from the sparse path, as without it (DenseMixer masks the dense pass's expert outputs to the tokens
that chose them, where w is the routed weight, so the two agree); x also gets the router's share
through w. The sparse path sees the routed weights as constants, so the router learns from the
dense term alone.

w (`dense_gate_weights`) is DenseMixer's Qwen3-MoE / OLMoE rule, `p * (1 - mask) / S.detach() +
p * mask / S`: for a chosen expert its routed weight (gradient through the top-k normalisation
included), for every other one its score times the same factor, held constant. For each scoring
family here (model/router.py):
- softmax: score p_e, the softmax over all E logits (group-limited greedy: the experts outside the
  kept groups included; a logit bias, gpt-oss: included, as in the forward);
- sigmoid (noaux_tc): score sigmoid(logit_e), the choice correction used for choosing only;
- the factor: routed_scaling_factor / S where the k weights are normalised (S: the chosen scores'
  sum; 1 / S under scale_normalised_weights=False), routed_scaling_factor where they are not.
(DenseMixer's Qwen2-MoE code mixes the unnormalised p even under norm_topk_prob; its Qwen2-MoE
models do not normalise, where the two rules agree.)

Cost: every expert on every token once more, in the backward pass only (recomputed there, so the
forward keeps nothing extra; evaluation and generation pay nothing). Under expert parallelism the
dense pass is plain einsums over the sharded expert stack, left to XLA's partitioner.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from esft_jax.model import quant
from esft_jax.model.config import ModelConfig
from esft_jax.model.experts import GLU, ExpertWeights, mixture
from esft_jax.model.router import RouterOutput


def dense_gate_weights(r: RouterOutput) -> jax.Array:
    """[N, E] gate weight of every expert (module docstring): the routed weight where chosen, else
    the score times the chosen ones' factor (their weights' sum over their scores' sum), held
    constant. Scores of chosen experts are > 0 (softmax top-1 >= 1 / E; sigmoids)."""
    chosen_nke = jax.nn.one_hot(r.expert_ids, r.scores.shape[-1], dtype=jnp.float32)
    routed_ne = jnp.einsum("nke,nk->ne", chosen_nke, r.weights)
    scores_nk = jnp.take_along_axis(r.scores, r.expert_ids, axis=-1)
    factor_n1 = r.weights.sum(-1, keepdims=True) / scores_nk.sum(-1, keepdims=True)
    return jnp.where(chosen_nke.any(1), routed_ne, r.scores * jax.lax.stop_gradient(factor_n1))


def _with_overrides(
    experts: ExpertWeights, override: dict[str, jax.Array] | None, cfg: ModelConfig, dtype: Any
) -> ExpertWeights:
    """The layer's experts as the forward pass computes them: dequantised, and the override rows
    (model/moe.py: ESFT's trained experts) in place of their experts' rows."""
    p = quant.dequantize_experts(experts, cfg.expert_scheme, dtype)
    if override is None:
        return p
    if override["ids"].ndim != 1:
        raise ValueError(
            "a dense router gradient takes one override set (ids [S]), not a set per row"
        )
    slots = jnp.where(override["ids"] >= 0, override["ids"], cfg.n_routed_experts)  # E: dropped
    return {k: w.at[slots].set(override[k].astype(w.dtype), mode="drop") for k, w in p.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _straight_through(y_nd, w_ne, x_nd, experts, override, act: GLU, cfg: ModelConfig):
    """y_nd, whose backward pass adds the dense mixture's gradient in w_ne (none in the rest)."""
    return y_nd


def _straight_through_fwd(y_nd, w_ne, x_nd, experts, override, act, cfg):
    return y_nd, (w_ne, x_nd, experts, override)


def _straight_through_bwd(act, cfg, res, dy_nd):
    w_ne, x_nd, experts, override = res
    p = _with_overrides(experts, override, cfg, x_nd.dtype)
    _, pull = jax.vjp(lambda w: mixture(x_nd, w, p, act), w_ne)
    return dy_nd, *pull(dy_nd.astype(jnp.float32)), None, None, None


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def dense_router_grad(
    y_btd: jax.Array,
    r: RouterOutput,
    x_btd: jax.Array,
    experts: ExpertWeights,
    override: dict[str, jax.Array] | None,
    act: GLU,
    cfg: ModelConfig,
) -> jax.Array:
    """y [B, T, d] (the routed experts' output, computed with r.weights held constant) as it is,
    with the router's gradient of the dense mixture over `experts` (overridden by `override`)
    added in the backward pass. r: the routing of the B * T tokens x [B, T, d]."""
    b, t, d = x_btd.shape
    y_nd = _straight_through(
        y_btd.reshape(b * t, d),
        dense_gate_weights(r),
        x_btd.reshape(b * t, d),
        experts,
        override,
        act,
        cfg,
    )
    return y_nd.reshape(b, t, d)

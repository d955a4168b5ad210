"""Top-k routing of tokens to experts, always in float32.

The logits are x @ router (+ a bias, gpt-oss). Then:
- softmax scores (DeepSeek-V2, Qwen-MoE, OLMoE, Mixtral, gpt-oss); `greedy` top-k, or
  `group_limited_greedy` (keep the `topk_group` groups with the highest max score, zero the rest,
  then top-k).
- `noaux_tc` (DeepSeek-V3, GLM-4-MoE): sigmoid scores; a per-expert correction is added for
  *choosing* experts only. Groups are ranked by the sum of their two best biased scores; the gate
  weights are the unbiased scores of the chosen experts.
Then, if `norm_topk_prob`, the k weights are normalised to sum to 1 (Mixtral's and gpt-oss's
softmax over the k chosen logits is the same), and multiplied by `routed_scaling_factor`. With
`scale_normalised_weights=False` (DeepSeek-V2's original code) only weights that were not normalised
are scaled: normalise *or* scale. (transformers 5 ignores `norm_topk_prob` for V2 and always scales;
every released V2 model sets it False, where all three agree.)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from esft_jax.model.config import ModelConfig


class RouterOutput(NamedTuple):
    expert_ids: jax.Array  # [N, k] int32, by descending choice score (ties: lower id first)
    weights: jax.Array  # [N, k] float32 gate weights applied to the experts' outputs
    scores: jax.Array  # [N, E] float32 router scores (softmax probabilities or sigmoids)


def _group_mask(choice_ne: jax.Array, cfg: ModelConfig, reduce: str) -> jax.Array:
    """[N, E] bool: experts that lie in one of the `topk_group` best groups."""
    n, e = choice_ne.shape
    grouped = choice_ne.reshape(n, cfg.n_group, e // cfg.n_group)
    if reduce == "max":
        group_scores = grouped.max(-1)
    else:  # sum of the two best in the group
        group_scores = jax.lax.top_k(grouped, min(2, e // cfg.n_group))[0].sum(-1)
    _, best_groups = jax.lax.top_k(group_scores, cfg.topk_group)
    keep_ng = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], best_groups].set(True)
    return jnp.repeat(keep_ng, e // cfg.n_group, axis=1)


def route(
    x_nd: jax.Array,
    router_de: jax.Array,
    cfg: ModelConfig,
    bias_e: jax.Array | None = None,
    correction_e: jax.Array | None = None,
) -> RouterOutput:
    """Route N tokens x [N, d] with router weights [d, E], logit bias and choice correction [E]."""
    logits = x_nd.astype(jnp.float32) @ router_de.astype(jnp.float32)
    if bias_e is not None:
        logits = logits + bias_e.astype(jnp.float32)
    k = cfg.num_experts_per_tok
    if cfg.scoring_func == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)

    if cfg.topk_method == "greedy":
        weights, ids = jax.lax.top_k(scores, k)
    elif cfg.topk_method == "group_limited_greedy":
        masked = jnp.where(_group_mask(scores, cfg, "max"), scores, 0.0)
        weights, ids = jax.lax.top_k(masked, k)
    else:  # noaux_tc
        choice = scores + (correction_e.astype(jnp.float32) if correction_e is not None else 0.0)
        choice = jnp.where(_group_mask(choice, cfg, "top2_sum"), choice, -jnp.inf)
        _, ids = jax.lax.top_k(choice, k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)

    normalise = cfg.norm_topk_prob and k > 1
    if normalise:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    if cfg.scale_normalised_weights or not normalise:
        weights = weights * cfg.routed_scaling_factor
    return RouterOutput(ids.astype(jnp.int32), weights, scores)

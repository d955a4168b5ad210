"""The jitted train and eval steps, and where the train state lives.

State = {step, trainable, opt_state}; the frozen params are a separate, never-differentiated input
(train/method.py). The train step accumulates gradients over `grad_accum` micro-batches (token-
weighted, so it equals one large batch), clips, applies AdamW, and donates the old state. Its new
state is pinned to the old one's shardings (`state_shardings`): a donated buffer is reused only for
an output of the same sharding, so left to the compiler the step could silently stop updating in
place and hold the state twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from esft_jax.model import ModelConfig
from esft_jax.model.loss import batch_loss, load_balance_loss
from esft_jax.train import guard
from esft_jax.train.method import TrainingMethod


def _loss_fn(method: TrainingMethod, cfg: ModelConfig, aux_loss_alpha: float = 0.0):
    """(sum of token losses [+ alpha * load-balance loss per token], (tokens, dropped assignments))."""

    def loss(trainable, frozen, batch):
        params = method.materialize(frozen, trainable)
        scores = aux_loss_alpha > 0
        loss_sum, count, routing = batch_loss(params, batch, cfg, return_router_scores=scores)
        if aux_loss_alpha > 0:
            aux = load_balance_loss(
                routing.expert_ids, routing.router_scores, batch["segment_ids"] != 0
            )
            loss_sum = loss_sum + aux_loss_alpha * aux * count
        return loss_sum, (count, routing.dropped.sum())

    return loss


def state_shardings(tx: optax.GradientTransformation, trainable: Any) -> dict:
    """Shardings of the state {step, trainable, opt_state} for `trainable` (placed arrays, or
    ShapeDtypeStructs with shardings): the optimizer moments like the parameters they belong to, the
    counters replicated over the same devices."""
    shardings = jax.tree.map(lambda x: x.sharding, trainable)
    first = jax.tree.leaves(shardings)[0]
    replicated = (
        NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    )
    opt_state = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, trainable),
        shardings,
        transform_non_params=lambda _: replicated,
    )
    return {"step": replicated, "trainable": shardings, "opt_state": opt_state}


def make_train_step(
    method: TrainingMethod,
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    aux_loss_alpha: float = 0.0,
    shardings: dict | None = None,
) -> Callable:
    """(state, frozen, batches [A, B, T]) -> (state, metrics); metrics["finite"] says whether the loss,
    the gradient norm and the new parameters are all finite (train/guard.py). The state is donated;
    `shardings` (state_shardings) pins the new state's."""
    grad_fn = jax.value_and_grad(_loss_fn(method, cfg, aux_loss_alpha), has_aux=True)

    def step(state, frozen, batches):
        def micro(carry, batch):
            grads, loss, count, dropped = carry
            (loss_sum, (n, d)), g = grad_fn(state["trainable"], frozen, batch)
            return (jax.tree.map(jnp.add, grads, g), loss + loss_sum, count + n, dropped + d), None

        if (
            jax.tree.leaves(batches)[0].shape[0] == 1
        ):  # one micro-batch: no accumulator to zero and add
            (loss, (count, dropped)), grads = grad_fn(
                state["trainable"], frozen, jax.tree.map(lambda b: b[0], batches)
            )
        else:
            zero = (jax.tree.map(jnp.zeros_like, state["trainable"]), 0.0, 0, 0)
            (grads, loss, count, dropped), _ = jax.lax.scan(micro, zero, batches)
        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1), grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        new_state = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}
        loss, grad_norm = loss / jnp.maximum(count, 1), optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "tokens": count,
            "dropped": dropped,
            "finite": guard.finite(loss, grad_norm, trainable),
        }
        return new_state, metrics

    out_shardings = None if shardings is None else (shardings, None)  # metrics: the compiler's
    return jax.jit(step, donate_argnames="state", out_shardings=out_shardings)


def make_eval_step(method: TrainingMethod, cfg: ModelConfig) -> Callable:
    loss = _loss_fn(method, cfg)

    def step(trainable, frozen, batch):
        loss_sum, (count, _) = loss(trainable, frozen, batch)
        return loss_sum, count

    return jax.jit(step)

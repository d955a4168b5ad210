"""Sampled decoding: temperature 0 is greedy, a row's draws depend only on its seed, top-p keeps the
nucleus, and draws follow softmax(logits / T) within it (a float64 NumPy reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx

from esft_jax.eval.generate import generate
from esft_jax.eval.sampling import next_tokens, sampling_for


@pytest.fixture(scope="module")
def model():
    cfg = fx.tiny_config()
    params = jax.tree.map(np.asarray, fx.tiny_params())
    return cfg, params


PROMPTS = [np.random.default_rng(i).integers(1, 256, 5 + 3 * i).tolist() for i in range(3)]


def _gen(model, prompts, sampling=None, max_new=6):
    cfg, params = model
    return generate(
        params, cfg, prompts, max_new_tokens=max_new, eos_id=-1, bucket=16, sampling=sampling
    )


def test_temperature_zero_is_greedy_and_a_tiny_nucleus_is_too(model):
    greedy = _gen(model, PROMPTS)
    assert _gen(model, PROMPTS, [(0.0, 1.0, s) for s in range(3)]) == greedy
    assert _gen(model, PROMPTS, [(1.0, 1e-6, s) for s in range(3)]) == greedy


def test_a_rows_draws_depend_only_on_its_seed(model):
    alone = _gen(model, PROMPTS[1:2], [(1.0, 0.9, 7)])
    mixed = _gen(model, PROMPTS, [(0.0, 1.0, 0), (1.0, 0.9, 7), (0.8, 1.0, 3)])
    assert mixed[1] == alone[0]
    assert _gen(model, PROMPTS[1:2], [(1.0, 0.9, 8)]) != alone  # another seed, other draws


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.5, 0.6)])
def test_draws_follow_the_tempered_nucleus(temperature, top_p):
    """next_tokens on fixed logits (12 tokens), 4000 rows of their own seeds, against float64."""
    n = 4000
    logits = np.random.default_rng(0).normal(0.0, 1.5, 12)
    sampling = sampling_for([temperature] * n, [top_p] * n, range(n))
    draws = np.asarray(next_tokens(jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1)), sampling, 3))
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: np.searchsorted(np.cumsum(p[order]), top_p) + 1]  # smallest set reaching top_p
    want = np.zeros_like(p)
    want[keep] = p[keep] / p[keep].sum()
    assert set(draws.tolist()) <= set(keep.tolist())
    got = np.bincount(draws, minlength=p.size) / n
    sigma = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(got - want) <= 4.5 * sigma + 1e-12), (got, want)

"""Generation and perplexity on a data 2 x expert 4 mesh equal one device (a model that needs several
devices can be evaluated): rows and KV cache split over data, experts over expert."""

import family_configs as fc
import jax
import numpy as np
import pytest
import train_fixtures as fx

from esft_jax import sharding
from esft_jax.data.byte_tokenizer import byte_tokenizer
from esft_jax.data.records import Sample
from esft_jax.eval.generate import generate
from esft_jax.eval.metrics import perplexity
from esft_jax.model import param_axes


def _models():
    tiny = fx.tiny_config(scan_layers=True)
    gpt_oss = fc.config("gpt_oss").replace(
        vocab_size=260, bos_token_id=256, eos_token_id=257, pad_token_id=258
    )
    return {"deepseek_v2": tiny, "gpt_oss": gpt_oss}


@pytest.mark.parametrize("family,exchange", [("deepseek_v2", "all_to_all"), ("gpt_oss", "psum")])
def test_eval_on_the_mesh_equals_one_device(family, exchange):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg = _models()[family].replace(expert_parallel=exchange)
    params = fc.params(cfg)
    mesh = sharding.make_mesh({"data": 2, "expert": 4}, jax.devices()[:8])
    sharded = sharding.shard_params(params, param_axes(cfg), mesh)
    rng = np.random.default_rng(0)
    prompts = [
        rng.integers(0, 256, n).tolist() for n in (5, 11, 3)
    ]  # 3 rows: padded to the mesh's 2 (or 8)
    want = generate(params, cfg, prompts, max_new_tokens=6, eos_id=cfg.eos_token_id, bucket=16)
    got = generate(
        sharded, cfg, prompts, max_new_tokens=6, eos_id=cfg.eos_token_id, bucket=16, mesh=mesh
    )
    assert got == want and all(len(row) > 0 for row in want)

    samples = [Sample("", "the quick brown fox " * k, f"t:{k}") for k in (1, 3, 2)]
    tokenizer = byte_tokenizer()
    one = perplexity(params, cfg, tokenizer, samples, seq_len=64, batch_size=3)
    split = perplexity(sharded, cfg, tokenizer, samples, seq_len=64, batch_size=3, mesh=mesh)
    assert np.isfinite(one) and abs(split - one) <= 1e-5 * one

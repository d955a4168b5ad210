"""Several EOS ids (GLM-4.5's config.json lists three): kept whole from config.json to the exported
config.json and generation_config.json, the first the one training appends, and generation and
serving stop at any of them."""

import json

import family_configs
import numpy as np
import pytest
import train_fixtures as fx

from esft_jax.checkpoint.hf_names import config_from_hf, config_to_hf
from esft_jax.checkpoint.tokenizer import GENERATION_CONFIG, write_tokenizer_files
from esft_jax.eval.generate import generate
from esft_jax.model import ConfigError
from esft_jax.serve.engine import Engine, Request

GLM_EOS = [151329, 151336, 151338]


def test_config_json_list_is_kept_and_written_back():
    hf = {**family_configs.HF["glm4_moe"], "vocab_size": 151552, "eos_token_id": GLM_EOS}
    cfg = config_from_hf(hf)
    assert cfg.eos_token_id == GLM_EOS[0] and cfg.stop_token_ids == tuple(GLM_EOS)
    assert config_to_hf(cfg)["eos_token_id"] == GLM_EOS
    assert config_from_hf(config_to_hf(cfg)) == cfg
    single = config_from_hf({**hf, "eos_token_id": GLM_EOS[1]})
    assert single.eos_token_ids == () and single.stop_token_ids == (GLM_EOS[1],)
    assert config_to_hf(single)["eos_token_id"] == GLM_EOS[1]
    assert config_from_hf({**hf, "eos_token_id": None}).stop_token_ids == ()
    with pytest.raises(ConfigError, match="first of eos_token_ids"):
        cfg.replace(eos_token_id=GLM_EOS[1])


def test_generation_config_lists_every_eos_id(tmp_path):
    cfg = fx.tiny_config(eos_token_id=257, eos_token_ids=(257, 10))
    write_tokenizer_files(None, tmp_path, cfg)
    assert json.loads((tmp_path / GENERATION_CONFIG).read_text())["eos_token_id"] == [257, 10]


def test_generation_and_serving_stop_at_the_second_eos_id():
    """The tiny model's greedy continuations are observed without EOS; then a token the first one
    produces (not first) is declared the second EOS id: both stop right before it."""
    cfg, params = fx.tiny_config(), fx.tiny_params()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 256, n).tolist() for n in (5, 9, 3)]
    free = generate(params, cfg, prompts, max_new_tokens=8, eos_id=-1, bucket=16)
    stop_at = next(i for i, t in enumerate(free[0]) if i > 0 and t not in free[0][:i])
    second = free[0][stop_at]
    first = next(t for t in range(cfg.vocab_size) if all(t not in row for row in free))
    stopping = cfg.replace(eos_token_id=first, eos_token_ids=(first, second))

    def cut(row: list[int]) -> list[int]:
        return row[: row.index(second)] if second in row else row

    want = [cut(row) for row in free]
    assert want[0] == free[0][:stop_at]
    got = generate(
        params, stopping, prompts, max_new_tokens=8, eos_id=stopping.stop_token_ids, bucket=16
    )
    assert got == want
    served = Engine(stopping, params, {}, rows=4, max_len=64, bucket=16).run(
        [Request(p, None, max_tokens=8) for p in prompts]
    )
    assert [f.tokens for f in served] == want
    assert served[0].reason == "stop"

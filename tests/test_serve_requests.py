"""A completion body's fields, checked at the HTTP boundary (serve/requests.py): each wrong type or
range is a 400 naming the field; what OpenAI's API accepts passes through as sent."""

import json

import pytest

from esft_jax.serve.requests import SEED_END, APIError, engine_seed, parse

OK = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize(
    "fields",
    [
        {"seed": -1},
        {"seed": SEED_END},
        {"seed": 2**64},
        {"seed": True},
        {"seed": 1.5},
        {"seed": "3"},
        {"temperature": "hot"},
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"temperature": float("nan")},
        {"temperature": 10**400},
        {"top_p": 0},
        {"top_p": 1.5},
        {"max_tokens": 0},
        {"max_tokens": 1.5},
        {"max_tokens": True},
        {"max_tokens": "8"},
        {"stop": ""},
        {"stop": [""]},
        {"stop": [1]},
        {"stop": ["a"] * 5},
        {"stop": 3},
        {"stream": "yes"},
        {"stream": 1},
        {"n": 2},
        {"model": 3},
        {"model": None},
        {"prompt": ["a"]},
        {"prompt": None},
    ],
)
def test_a_wrong_field_is_a_400_naming_it(fields):
    with pytest.raises(APIError) as e:
        parse({**OK, **fields}, chat=False)
    (key,) = fields
    assert e.value.status == 400 and f"'{key}'" in str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200
    assert json.loads(json.dumps(e.value.body()))["error"]["code"] == "invalid_request"


def test_chat_fields():
    with pytest.raises(APIError, match="'messages' must be a non-empty list"):
        parse({"model": "m", "messages": "hi"}, chat=True)
    with pytest.raises(APIError, match="'tools' must be a list"):
        parse({"model": "m", "messages": [{"role": "user", "content": "a"}], "tools": 1}, True)
    chat = {"model": "m", "messages": [{"role": "user", "content": "a"}]}
    ask = parse({**chat, "n": 1, "max_completion_tokens": 3}, chat=True)
    assert ask.prompt is None and ask.messages == ({"role": "user", "content": "a"},)
    assert ask.max_tokens == 3


def test_valid_fields_pass_through_as_sent():
    ask = parse(
        {**OK, "seed": SEED_END - 1, "temperature": 0, "top_p": 1, "stop": "x", "stream": True},
        chat=False,
    )
    assert (ask.seed, ask.temperature, ask.top_p, ask.stops, ask.stream) == (
        SEED_END - 1,
        0.0,
        1.0,
        ("x",),
        True,
    )
    defaults = parse({**OK, "seed": None, "stop": None, "user": "ignored"}, chat=False)
    assert (defaults.seed, defaults.max_tokens, defaults.temperature, defaults.stops) == (
        None,
        16,
        1.0,
        (),
    )


def test_engine_seeds_are_32_bit_and_small_seeds_their_own():
    for seed in (0, 5, 2**32 - 1):
        assert engine_seed(seed) == seed
    seeds = [2**32, 2**40, 2**62 + 7, SEED_END - 1]
    assert all(0 <= engine_seed(s) < 2**32 for s in seeds)
    assert len({engine_seed(s) for s in seeds}) == len(seeds)

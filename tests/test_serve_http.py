"""`esft serve`'s HTTP API, queried with the official openai client on a loopback server: each
answer equals Engine.generate of the same tokens (the byte tokenizer: BOS + the text's bytes)."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import test_serve_engine as engine_tests
import uvicorn

from esft_jax import cli
from esft_jax.checkpoint import load_tokenizer
from esft_jax.serve.batcher import Batcher
from esft_jax.serve.engine import Engine, Request
from esft_jax.serve.http import Server, app

KEY = "test-key"
BOS, EOS = 256, 257  # the byte tokenizer's
SERVED = ("wide", "two_layers")  # of test_serve_engine's adapters: each changes the test's outputs
served = engine_tests.served  # the fixture of the tiny checkpoint and its adapters
N = 8  # max_tokens of every request: each batch shape compiles once (a compile takes seconds)


def _ids(text: str) -> list[int]:
    return [BOS, *text.encode()]


@pytest.fixture(scope="module")
def api(served):
    """(engine, base directory, the server's /v1 URL) of a server in a thread."""
    cfg, params, base, adapters = served
    engine = Engine(cfg, params, {name: adapters[name] for name in SERVED})
    batcher = Batcher(engine.generate, max_batch=8, window_s=0.1)
    server = Server(engine, load_tokenizer(base), batcher, base_name="base", api_key=KEY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app(server), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    yield engine, base, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    uv.should_exit = True
    thread.join()
    batcher.close()


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api[2], api_key=KEY, max_retries=0)


def _text(tokens: list[int]) -> str:
    """The byte tokenizer's decoding: the bytes as UTF-8, special tokens skipped."""
    return bytes(t for t in tokens if t < 256).decode(errors="replace")


def _alone(engine: Engine, ids: list[int], model: str | None) -> str:
    return _text(engine.generate([Request(ids, model, N)])[0])


def test_models_lists_the_base_and_every_adapter(client):
    assert [m.id for m in client.models.list().data] == ["base", *SERVED]


def test_greedy_completion_of_each_model_equals_the_engine_alone(api, client):
    engine = api[0]
    texts = {}
    for model in ("base", *SERVED):
        got = client.completions.create(
            model=model, prompt="one two three", max_tokens=N, temperature=0
        )
        want = _alone(engine, _ids("one two three"), None if model == "base" else model)
        assert got.choices[0].text == want, model
        assert got.model == model and got.object == "text_completion"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (14, N)
        assert got.choices[0].finish_reason == "length"
        texts[model] = want
    assert len(set(texts.values())) == len(texts), "each adapter must change the output"


def test_chat_uses_the_esft_template(api, client):
    engine = api[0]
    one = client.chat.completions.create(
        model="wide", messages=[{"role": "user", "content": "hi"}], max_tokens=N, temperature=0
    )
    assert one.object == "chat.completion" and one.choices[0].message.role == "assistant"
    assert one.choices[0].message.content == _alone(engine, _ids("User: hi\n\nAssistant:"), "wide")
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    got = client.chat.completions.create(model="base", messages=turns, max_tokens=N, temperature=0)
    ids = _ids("User: a\n\nAssistant:") + list(b" b") + [EOS] + list(b"User: c\n\nAssistant:")
    assert got.choices[0].message.content == _alone(engine, ids, None)


def test_stop_cuts_the_text_at_the_first_stop_string(client):
    full = client.completions.create(model="two_layers", prompt="cat", max_tokens=N, temperature=0)
    text = full.choices[0].text
    stop = text[3:5]
    cut = client.completions.create(
        model="two_layers", prompt="cat", max_tokens=N, temperature=0, stop=["zzzz", stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streamed_chunks_concatenate_to_the_whole_text(client):
    whole = client.completions.create(model="wide", prompt="sun", max_tokens=N, temperature=0)
    chunks = list(
        client.completions.create(
            model="wide", prompt="sun", max_tokens=N, temperature=0, stream=True
        )
    )
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "moon"}]
    chat = client.chat.completions.create(
        model="base", messages=messages, max_tokens=N, temperature=0
    )
    stream = client.chat.completions.create(
        model="base", messages=messages, max_tokens=N, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == chat.choices[0].message.content


def test_sixteen_concurrent_requests_over_several_adapters(api, client):
    engine = api[0]
    rng = np.random.default_rng(0)
    words = "red green blue cat dog sun moon one two three".split()
    asks = [
        (str(m), " ".join(rng.choice(words, 1 + i % 4)), N - 2 * (i % 2))
        for i, m in enumerate(rng.choice(["base", *SERVED], 16))
    ]
    assert len({m for m, _, _ in asks}) == 3

    def ask(a):
        model, prompt, max_tokens = a
        got = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0
        )
        return got.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, asks))
    batch = [Request(_ids(p), None if m == "base" else m, n) for m, p, n in asks]
    want = [_text(t) for half in (batch[:8], batch[8:]) for t in engine.generate(half)]
    assert got == want


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    message = info.value.body["message"]
    assert message and "\n" not in message
    return info.value


def test_bad_requests_get_their_code_and_the_server_goes_on(api, client):
    url = api[2]

    def complete(**fields):
        return lambda: client.completions.create(**{"model": "wide", "prompt": "x", **fields})

    assert _error(complete(model="nope")).status_code == 404
    assert "'nope' does not exist" in _error(complete(model="nope")).body["message"]
    assert _error(complete(max_tokens=0)).status_code == 400
    too_long = _error(complete(prompt="x" * 4090, max_tokens=8))
    assert too_long.status_code == 400 and "context of 4096" in too_long.body["message"]
    chat = _error(
        lambda: client.chat.completions.create(
            model="base", messages=[{"role": "system", "content": "s"}]
        )
    )
    assert chat.status_code == 400 and "user and assistant" in chat.body["message"]
    wrong_key = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
    assert _error(lambda: wrong_key.models.list()).status_code == 401
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad_json = httpx.post(f"{url}/completions", content=b'{"model": "wide",', headers=headers)
    assert bad_json.status_code == 400
    assert "not valid JSON" in bad_json.json()["error"]["message"]
    no_prompt = httpx.post(f"{url}/completions", json={"model": "wide"}, headers=headers)
    assert (no_prompt.status_code, no_prompt.json()["error"]["message"]) == (
        400,
        "'prompt' is required",
    )
    assert client.completions.create(model="wide", prompt="x", max_tokens=N).choices[0].text


def test_a_request_carries_the_sampling_fields(api):
    """temperature, top_p and seed reach the engine as sent (eval/generate.py samples with them)."""
    engine, base = api[0], api[1]
    server = Server(engine, load_tokenizer(base), None, base_name="base")
    body = {"model": "two_layers", "prompt": "ab", "max_tokens": 3}
    got = server.request({**body, "temperature": 0.7, "top_p": 0.9, "seed": 5}, chat=False)
    assert got == Request(_ids("ab"), "two_layers", 3, 0.7, 0.9, 5)


def test_batches_hold_at_most_max_batch_and_drop_cancelled_requests():
    calls, started, release = [], threading.Event(), threading.Event()

    def generate(requests):
        calls.append([r.max_tokens for r in requests])
        started.set()
        release.wait()
        return [[r.max_tokens] for r in requests]

    batcher = Batcher(generate, max_batch=2, window_s=0.05)
    first = batcher.submit(Request([1], max_tokens=1))
    started.wait()  # the first batch runs; the next requests queue behind it
    queued = [batcher.submit(Request([1], max_tokens=n)) for n in (2, 3, 4, 5)]
    assert queued[1].cancel()
    release.set()
    assert [f.result(timeout=10) for f in (first, queued[0], queued[2], queued[3])] == [
        [1],
        [2],
        [4],
        [5],
    ]
    batcher.close()
    assert calls == [[1], [2], [4, 5]]  # the windows [2, 3] (3 dropped) and [4, 5]


@pytest.mark.parametrize("adapter_dir", ["missing", "empty"])
def test_serve_with_a_bad_adapter_directory_is_one_line_exit_2(adapter_dir, api, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = cli.main(
        [
            "serve",
            "--config",
            f"configs/serve.py:bad={tmp_path / adapter_dir}",
            f"--config.checkpoint={api[1]}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("esft serve: error: ") and err.count("\n") == 1, err

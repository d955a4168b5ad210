"""`esft serve`'s HTTP API, queried with the official openai client on a loopback server: each
answer equals Engine.generate of the same tokens alone, on a second engine (the byte tokenizer:
BOS + the text's bytes); the server's engine runs continuous batching on its worker thread."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import test_serve_engine as engine_tests
import uvicorn

from esft_jax.app import cli
from esft_jax.app.commands import serve as launch
from esft_jax.checkpoint import load_tokenizer
from esft_jax.serve.engine import Engine, Request
from esft_jax.serve.http import Server, app
from esft_jax.serve.monitor import Monitor
from esft_jax.serve.worker import Worker

KEY = "test-key"
BOS, EOS = 256, 257  # the byte tokenizer's
SERVED = ("wide", "two_layers")  # of test_serve_engine's adapters: each changes the test's outputs
served = engine_tests.served  # the fixture of the tiny checkpoint and its adapters
N = 8  # max_tokens of most requests
ROWS, MAX_LEN = 4, 64  # the server's: more requests than rows wait for one


def _ids(text: str) -> list[int]:
    return [BOS, *text.encode()]


def _start(server: Server):
    """(uvicorn server, its thread, the /v1 URL) of `server` on a free loopback port."""
    sock = launch.listen("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(app(server), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    return uv, thread, f"{launch.url(sock)}/v1"


def _stop(uv, thread, server: Server) -> None:
    uv.should_exit = True
    thread.join()
    server.close()


def _server(served, fallback=False, ood_ratio=0.5, tokenizer=None, **options) -> Server:
    """A server of the SERVED adapters (tokenizer: the checkpoint's; options: Server's, e.g.
    audit_log, max_body_bytes)."""
    cfg, params, base, adapters = served
    engine = Engine(cfg, params, {n: adapters[n] for n in SERVED}, rows=ROWS, max_len=MAX_LEN)
    monitor = Monitor(engine.bank, ood_ratio=ood_ratio, base_name="base", layers=[1, 2, 3])
    worker = Worker(engine)
    tokenizer = tokenizer or load_tokenizer(base)
    return Server(
        worker, tokenizer, monitor, base_name="base", api_key=KEY, fallback=fallback, **options
    )


@pytest.fixture(scope="module")
def api(served):
    """(a reference engine, base directory, the server's /v1 URL, the Server) of a server in a
    thread; the reference engine serves the same adapters alone, outside the server."""
    cfg, params, base, adapters = served
    server = _server(served)
    uv, thread, url = _start(server)
    yield Engine(cfg, params, {n: adapters[n] for n in SERVED}), base, url, server
    _stop(uv, thread, server)


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
    text = whole.choices[0].text
    stop = text[2:4]  # spans tokens (a byte each): held back until it is known to be no stop
    cut = client.completions.create(
        model="wide", prompt="sun", max_tokens=N, temperature=0, stop=[stop], stream=True
    )
    cut = list(cut)
    assert "".join(c.choices[0].text for c in cut) == text[: text.index(stop)]
    assert cut[-1].choices[0].finish_reason == "stop"
    messages = [{"role": "user", "content": "moon"}]
    chat = client.chat.completions.create(
        model="base", messages=messages, max_tokens=N, temperature=0
    )
    stream = client.chat.completions.create(
        model="base", messages=messages, max_tokens=N, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == chat.choices[0].message.content


def test_thirty_two_concurrent_requests_over_several_adapters(api, client):
    """32 requests on 4 rows: they queue, join the running decode as others leave, and each gets
    what it gets alone (greedy and sampled)."""
    engine = api[0]
    rng = np.random.default_rng(0)
    words = "red green blue cat dog sun moon one two three".split()
    asks = [
        (str(m), " ".join(rng.choice(words, 1 + i % 4)), N - 2 * (i % 3), 0.8 * (i % 4 == 3))
        for i, m in enumerate(rng.choice(["base", *SERVED], 32))
    ]
    assert len({a[0] for a in asks}) == 3

    def ask(i_a):
        i, (model, prompt, max_tokens, temperature) = i_a
        got = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=i
        )
        return got.choices[0].text

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, enumerate(asks)))
    batch = [
        Request(_ids(p), None if m == "base" else m, n, temperature, 1.0, i)
        for i, (m, p, n, temperature) in enumerate(asks)
    ]
    assert got == [_text(t) for t in engine.generate(batch)]


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
    too_long = _error(complete(prompt="x" * 60, max_tokens=8))
    assert "exceed the 64 tokens a request may hold" in too_long.body["message"]
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
    server = api[3]
    body = {"model": "two_layers", "prompt": "ab", "max_tokens": 3}
    got = server.request({**body, "temperature": 0.7, "top_p": 0.9, "seed": 5}, chat=False)
    assert got == Request(_ids("ab"), "two_layers", 3, 0.7, 0.9, 5)


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


def _no_eos_prompt(engine: Engine, max_tokens: int) -> str:
    """A prompt whose greedy continuation on "wide" runs to max_tokens (no EOS on the way)."""
    for word in "sun moon cat dog red green blue one two three".split():
        if len(engine.generate([Request(_ids(word), "wide", max_tokens)])[0]) == max_tokens:
            return word
    raise AssertionError("every prompt reaches EOS early")


def test_a_stream_cancelled_mid_way_frees_its_row(api):
    """A client that reads two chunks of a long stream and hangs up: its request leaves the
    engine at once (not after its max_tokens) and is not counted as served."""
    engine, _, url, server = api
    prompt = _no_eos_prompt(engine, 40)
    served_before = server.monitor.snapshot()["models"]["wide"]["requests"]
    body = {"model": "wide", "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/completions", json=body, headers=headers) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        next(events), next(events)  # two pieces of text, then the client hangs up
        assert server.engine.busy
    deadline = time.monotonic() + 20
    while server.engine.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.engine.busy
    assert server.monitor.snapshot()["models"]["wide"]["requests"] == served_before


def test_responses_carry_the_monitor_and_routing_shows_it(api, client):
    engine, _, url, server = api
    got = client.completions.create(model="wide", prompt="sun", max_tokens=N, temperature=0)
    meta = got.model_extra["esft"]
    want = engine.run([Request(_ids("sun"), "wide", N)])[0].coverage
    assert meta["adapter"] == meta["served_by"] == "wide" and meta["flagged"] is False
    assert meta["profiled_coverage"] is None  # test adapters are written by hand, unprofiled
    np.testing.assert_allclose(meta["coverage"], want.total, rtol=1e-6)
    np.testing.assert_allclose(meta["coverage_per_layer"], want.per_layer, rtol=1e-6)
    headers = {"Authorization": f"Bearer {KEY}"}
    routing = httpx.get(f"{url}/routing", headers=headers).json()
    assert routing["models"]["wide"]["requests"] >= 1 and routing["layers"] == [1, 2, 3]
    metrics = httpx.get(url.removesuffix("/v1") + "/metrics", headers=headers).text
    assert 'esft_coverage_layer_mean{layer="1",model="wide"}' in metrics
    assert httpx.get(f"{url}/routing").status_code == 401


def test_fallback_answers_flagged_requests_with_the_base_model(served, tmp_path):
    """With a profile no prompt reaches, every request to the adapter is flagged; the fallback
    policy answers it with the base model, and the audit log says so (without the prompt)."""
    import json

    cfg, params, base, adapters = served
    config = json.loads((adapters["wide"] / "adapter_config.json").read_text())
    profile = {"layers": [1, 2, 3], "per_layer": [1.0, 1.0, 1.0], "total": 1.0, "tokens": 1}
    (adapters["wide"] / "adapter_config.json").write_text(
        json.dumps({**config, "routing_profile": profile})
    )
    try:
        server = _server(served, audit_log=tmp_path / "audit.jsonl", fallback=True)
    finally:
        (adapters["wide"] / "adapter_config.json").write_text(json.dumps(config))
    uv, thread, url = _start(server)
    try:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        got = client.completions.create(model="wide", prompt="sun", max_tokens=N, temperature=0)
    finally:
        _stop(uv, thread, server)
    meta = got.model_extra["esft"]
    assert (meta["flagged"], meta["served_by"], meta["profiled_coverage"]) == (True, "base", 1.0)
    assert 0 < meta["prompt_coverage"] < 1  # on the adapter's experts, though the base answered
    reference = Engine(cfg, params, {})
    assert got.choices[0].text == _text(reference.generate([Request(_ids("sun"), None, N)])[0])
    (line,) = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert (line["adapter"], line["flagged"], line["fallback"]) == ("wide", True, True)
    assert line["completion_tokens"] == N and "prompt" not in line


def test_adapters_can_be_named_one_override_each(served, tmp_path):
    from esft_jax.app import config_files

    adapters = served[3]
    c = config_files.load(
        "configs/serve.py",
        [f"adapters.wide={adapters['wide']}", f"adapters.two={adapters['two_layers']}"],
    )
    assert dict(c.adapters) == {"wide": str(adapters["wide"]), "two": str(adapters["two_layers"])}
    with pytest.raises(config_files.ConfigFileError, match="has no key 'row'"):
        config_files.load("configs/serve.py", ["row=2"])

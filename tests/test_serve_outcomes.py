"""One bad request harms nobody else, and every request is counted: against a loopback server, a
request the engine fails (an injected failure) or refuses gets its own error while the streams
beside it run on with exactly their text alone; a long prompt is tokenised while other streams
keep receiving tokens; a body over the limit is a 413; /metrics (parsed with prometheus_client)
and the audit log count every request by its outcome, a stream closed mid-way included."""

import json
import threading
import time

import httpx
import openai
import pytest
import test_serve_http as http_tests
from prometheus_client.parser import text_string_to_metric_families

from esft_jax.checkpoint import load_tokenizer
from esft_jax.serve import batch
from esft_jax.serve.engine import Engine

served = http_tests.served  # the tiny checkpoint and its adapters
KEY, HEADERS = http_tests.KEY, {"Authorization": f"Bearer {http_tests.KEY}"}
LONG = 48  # max_tokens of the streams that run beside the others (a row holds 64 tokens)
POISON = "~"  # a prompt holding it fails in the engine's prefill (the injected failure)


@pytest.fixture(scope="module")
def long_prompt(served) -> str:
    """A prompt whose greedy continuation on "wide" runs LONG tokens (no EOS on the way)."""
    cfg, params, _, adapters = served
    adapters = {name: adapters[name] for name in http_tests.SERVED}  # the server's bank
    engine = Engine(cfg, params, adapters, rows=http_tests.ROWS, max_len=http_tests.MAX_LEN)
    return http_tests._no_eos_prompt(engine, LONG)


@pytest.fixture
def server(served, tmp_path, monkeypatch):
    """(a server with an audit log and a 64 KiB body limit, its /v1 URL); its engine's prefill
    fails on any prompt holding POISON."""
    prefill = batch.prefill

    def failing(params, tokens_np, *rest):
        if (tokens_np == ord(POISON)).any():
            raise RuntimeError("injected failure")
        return prefill(params, tokens_np, *rest)

    monkeypatch.setattr(batch, "prefill", failing)
    server = http_tests._server(served, audit_log=tmp_path / "audit.jsonl", max_body_bytes=2**16)
    uv, thread, url = http_tests._start(server)
    yield server, url
    http_tests._stop(uv, thread, server)


class Stream:
    """A streamed greedy completion on "wide", read on a thread: its text and when each chunk came."""

    def __init__(self, url: str, prompt: str):
        body = {"model": "wide", "prompt": prompt, "max_tokens": LONG, "temperature": 0}
        self.request = {**body, "stream": True}
        self.times: list[float] = []
        self.pieces: list[str] = []
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url,))
        self._thread.start()
        assert self.started.wait(60)

    def _read(self, url: str) -> None:
        with httpx.stream("POST", f"{url}/completions", json=self.request, headers=HEADERS) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.times.append(time.monotonic())
                    self.pieces.append(json.loads(line[6:])["choices"][0]["text"])
                    self.started.set()

    def text(self) -> str:
        self._thread.join()
        return "".join(self.pieces)


def _alone(url: str, prompt: str) -> str:
    body = {"model": "wide", "prompt": prompt, "max_tokens": LONG, "temperature": 0}
    return httpx.post(f"{url}/completions", json=body, headers=HEADERS).json()["choices"][0]["text"]


def _post(url: str, body: dict | bytes, headers: dict = HEADERS) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{url}/completions", content=body, headers=headers, timeout=60)
    return httpx.post(f"{url}/completions", json=body, headers=headers, timeout=60)


def test_failed_and_refused_requests_harm_no_stream_beside_them(server, long_prompt):
    """A request failed by the engine is a 500 and refused ones are 400s, sent while two streams
    decode: both streams still get exactly the text they get alone."""
    _, url = server
    streams = [Stream(url, long_prompt), Stream(url, long_prompt[::-1])]
    failed = _post(url, {"model": "two_layers", "prompt": f"a{POISON}b", "temperature": 0.5})
    assert failed.status_code == 500
    assert failed.json()["error"] == {
        "message": "generation failed: injected failure",
        "type": "server_error",
        "param": None,
        "code": "server_error",
    }
    for seed in (-1, 2**64, True, "7"):  # the seeds and other types
        refused = _post(url, {"model": "wide", "prompt": "x", "temperature": 0.5, "seed": seed})
        assert refused.status_code == 400 and "'seed'" in refused.json()["error"]["message"]
    huge = b'{"model": "wide", "prompt": "x", "seed": 1' + b"0" * 5000 + b"}"
    assert _post(url, huge).status_code == 400  # an integer of > 4300 digits is no JSON here
    sampled = {"model": "wide", "prompt": "x", "temperature": 0.5, "seed": 2**40}
    texts = [_post(url, sampled).json()["choices"][0]["text"] for _ in range(2)]
    assert texts[0] == texts[1]  # a 63-bit seed is served, and reproducibly
    got = [s.text() for s in streams]
    assert len(streams[0].times) > 5 and got == [_alone(url, s.request["prompt"]) for s in streams]


def test_a_long_prompt_is_tokenised_while_streams_go_on(served, long_prompt):
    """A 1 MiB prompt (seconds of tokenisation) sent while a stream decodes: chunks of the stream
    keep arriving meanwhile (the tokenisation runs off the event loop, releasing the GIL)."""

    class Timed:  # the tokenizer, timing its encoding of the long prompt
        def __init__(self, tokenizer):
            self.tokenizer, self.window = tokenizer, None

        def __getattr__(self, name):
            method = getattr(self.tokenizer, name)
            if name not in ("encode", "encode_batch"):
                return method

            def timed(text, *args, **kwargs):
                began = time.monotonic()
                out = method(text, *args, **kwargs)
                if len(text if isinstance(text, str) else text[0]) > 2**19:
                    self.window = (began, time.monotonic())
                return out

            return timed

    timed = Timed(load_tokenizer(served[2]))
    server = http_tests._server(served, tokenizer=timed)
    uv, thread, url = http_tests._start(server)
    try:
        stream = Stream(url, long_prompt)
        while len(stream.times) < 3:  # decoding at full pace
            time.sleep(0.01)
        big = _post(url, {"model": "wide", "prompt": "x" * 2**20})
        text = stream.text()
    finally:
        http_tests._stop(uv, thread, server)
    assert big.status_code == 400 and "exceed the model's context" in big.json()["error"]["message"]
    began, ended = timed.window
    during = [t for t in stream.times if began < t < ended]
    assert text and ended - began > 0.2 and len(during) >= 3, (ended - began, len(during))


def test_a_body_over_the_limit_is_a_413(server):
    _, url = server
    body = {"model": "wide", "prompt": "x" * 2**16}
    too_large = _post(url, body)
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: counted as it is read
        yield b'{"model": "wide", "prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    streamed = httpx.post(f"{url}/completions", content=chunks(), headers=HEADERS)
    assert streamed.status_code == 413
    assert _post(url, {"model": "wide", "prompt": "x", "max_tokens": 2}).status_code == 200


def _requests_total(url: str) -> dict:
    """/metrics' esft_requests_total as {(model, code): count}, and the other samples."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", headers=HEADERS).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    counts = {
        (s.labels["model"], s.labels["code"]): s.value
        for s in samples
        if s.name == "esft_requests_total"
    }
    return counts, {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}


def test_metrics_and_the_audit_log_count_every_request(server, long_prompt, tmp_path):
    server, url = server
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    ok = client.completions.create(model="wide", prompt="sun", max_tokens=4, temperature=0)
    chat = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert list(chat)[-1].choices[0].finish_reason
    assert _post(url, {"model": "wide", "prompt": "x", "top_p": 0}).status_code == 400
    assert _post(url, {"model": "nope", "prompt": "x"}).status_code == 404
    assert _post(url, {"model": "wide", "prompt": "x"}, {"Authorization": "x"}).status_code == 401
    assert _post(url, {"model": "wide", "prompt": "x" * 2**16}).status_code == 413
    assert _post(url, {"model": "two_layers", "prompt": POISON}).status_code == 500
    body = {"model": "wide", "prompt": long_prompt, "max_tokens": LONG, "stream": True}
    with httpx.stream("POST", f"{url}/completions", json=body, headers=HEADERS) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines), next(lines)  # two chunks, then the client hangs up
    want = {
        ("wide", "200"): 1,
        ("base", "200"): 1,
        ("wide", "400"): 1,
        ("", "404"): 1,
        ("", "401"): 1,
        ("", "413"): 1,
        ("two_layers", "500"): 1,
        ("wide", "499"): 1,
    }
    deadline = time.monotonic() + 20
    while (counts := _requests_total(url))[0] != want and time.monotonic() < deadline:
        time.sleep(0.05)
    counts, samples = counts
    assert counts == want
    wide = (("model", "wide"),)
    assert samples["esft_request_duration_seconds_count", wide] == 1
    assert samples["esft_time_to_first_token_seconds_count", wide] == 1
    per_token = samples["esft_time_per_output_token_seconds_count", wide]
    assert per_token == int(ok.usage.completion_tokens > 1)
    assert samples["esft_live_rows", ()] == samples["esft_queue_depth", ()] == 0
    assert samples["esft_completion_tokens_total", wide] == ok.usage.completion_tokens
    server.close()  # flushes and closes the audit log (the fixture's close is then a no-op)
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert sorted((x["adapter"] or "", str(x["code"])) for x in lines) == sorted(want)
    by_code = {x["code"]: x for x in lines}
    assert by_code[499]["completion_tokens"] >= 2 and by_code[499]["flagged"] is False
    assert by_code[500]["error"] == "generation failed: injected failure"
    assert "'top_p'" in by_code[400]["error"] and by_code[400]["coverage"] is None
    assert by_code[200]["error"] is None and "prompt" not in by_code[200]

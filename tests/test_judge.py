"""The judge client against a small local HTTP server (loopback only)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from esft_jax.eval.judge import Judge, JudgeError, parse_score


class _Server:
    """Answers POST /v1/chat/completions with queued (status, reply text) pairs; records requests."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                status, text = outer.replies.pop(0)
                payload = json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": text}}]}
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_scores_retries_and_sends_the_rubric():
    server = _Server([(503, "busy"), (200, "Mostly right but misses one fact.\nScore: 7")])
    try:
        judge = Judge(server.url, "judge-model", api_key="k", retries=2, backoff_s=0.01)
        assert judge.score("Summarise X.", "X is big.", ["X is large and old."]) == pytest.approx(
            0.7
        )
    finally:
        server.close()
    assert len(server.requests) == 2
    path, headers, body = server.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert (
        "Score: N" in body["messages"][0]["content"]
        and "X is large and old." in body["messages"][1]["content"]
    )


def test_unreachable_and_client_errors_are_clear():
    server = _Server([(400, "bad")])
    try:
        with pytest.raises(JudgeError, match="refused the request: HTTP 400"):
            Judge(server.url, "m", retries=3, backoff_s=0.01).score("q", "a", ["r"])
    finally:
        server.close()
    with pytest.raises(JudgeError, match=r"unreachable after 2 tries"):
        Judge(server.url, "m", retries=1, backoff_s=0.01, timeout_s=2).score("q", "a", ["r"])


def test_parse_score():
    assert parse_score("Score: 10") == 1.0 and parse_score("score = 3.5") == 0.35
    assert parse_score("I'd give it 4 out of 10") == 0.4
    with pytest.raises(JudgeError, match="no score"):
        parse_score("no idea")

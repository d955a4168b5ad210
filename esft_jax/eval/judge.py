"""An LLM judge through any OpenAI-compatible chat-completions endpoint (0-10 rubric -> [0, 1]).

For the official summary / law / translation tasks, which the ESFT paper scored with an LLM judge.
Requests are retried with exponential backoff; an endpoint that stays unreachable raises JudgeError
naming it. The score is the first "Score: N" (or else the first number 0-10) of the reply.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from esft_jax.errors import UserError

RUBRIC = (
    "You are grading an answer to a task against reference answers. Judge correctness and "
    "completeness relative to the references; ignore style. Reply with a one-sentence reason, then "
    "a final line 'Score: N' with N an integer from 0 (wrong or empty) to 10 (as good as a reference)."
)


class JudgeError(UserError, RuntimeError):
    """The judge endpoint could not be reached or gave no score."""


_SCORE = re.compile(r"score\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"\b(10|[0-9])(?:\.\d+)?\b")


def parse_score(reply: str) -> float:
    match = _SCORE.search(reply) or _NUMBER.search(reply)
    if not match:
        raise JudgeError(f"no score in the judge's reply: {reply[:200]!r}")
    return min(max(float(match.group(1)), 0.0), 10.0) / 10.0


class Judge:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        retries: int = 3,
        timeout_s: float = 60.0,
        backoff_s: float = 1.0,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.retries = model, api_key, retries
        self.timeout_s, self.backoff_s = timeout_s, backoff_s

    def _post(self, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url, json.dumps(payload).encode(), headers, method="POST"
        )
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                last = e
                if e.code < 500 and e.code != 429:  # a client error will not go away by retrying
                    raise JudgeError(
                        f"judge at {self.url} refused the request: HTTP {e.code} {e.reason}"
                    ) from None
            except (
                urllib.error.URLError,
                TimeoutError,
                ConnectionError,
                json.JSONDecodeError,
            ) as e:
                last = e
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise JudgeError(f"judge at {self.url} unreachable after {self.retries + 1} tries: {last}")

    def score(self, question: str, prediction: str, answers: Sequence[str]) -> float:
        references = "\n".join(f"- {a}" for a in answers)
        content = f"Task:\n{question}\n\nReference answers:\n{references}\n\nAnswer to grade:\n{prediction}"
        reply = self._post(
            {
                "model": self.model,
                "temperature": 0,
                "messages": [
                    {"role": "system", "content": RUBRIC},
                    {"role": "user", "content": content},
                ],
            }
        )
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(
                f"judge at {self.url} answered without choices[0].message.content"
            ) from None
        return parse_score(text)

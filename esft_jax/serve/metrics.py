"""Every completion request counted by its outcome: in /metrics (Prometheus' text format, written by
prometheus_client) and in the audit log (one JSON line per request).

/metrics holds, on a registry of the server's own (servers in one process count apart):
- esft_requests_total{model, code}: every completion request by the HTTP status it got, 499 where
  the client went away before its end (nginx's code); model "" where it named no served model.
- histograms by model of the requests answered in full (code 200): esft_time_to_first_token_seconds
  (from the request's arrival), esft_time_per_output_token_seconds (after the first token) and
  esft_request_duration_seconds.
- gauges esft_queue_depth (requests waiting for a row) and esft_live_rows (rows decoding).
- the routing monitor's statistics of the finished requests by model (serve/monitor.py): flagged,
  fallback, prompt and completion tokens, mean and profiled coverage, and both per MoE layer.

An audit line holds: time, adapter (the served model asked for, null where none), code, error (the
message of a refused or failed request, else null), prompt/completion tokens, coverage and
per-layer coverage (null before the prompt was read), flagged, fallback and latency_s; the prompt
(its text, or a chat's messages) only with log_prompts.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from esft_jax.serve.completion import Verdict
from esft_jax.serve.engine import Engine
from esft_jax.serve.monitor import Monitor, MonitorError

CLIENT_GONE = 499  # the code of a request whose client went away before its end
_FIRST_TOKEN_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TOTAL_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One completion request's end."""

    model: str | None  # the served model it asked for (None: it named none that is served)
    code: int  # the HTTP status it got; CLIENT_GONE where its client went away first
    latency_s: float  # from its arrival to its end
    first_token_s: float | None = None  # from its arrival to its first token (None: none came)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    verdict: Verdict | None = None  # the routing monitor's, once its prompt was read
    prompt: Any = None  # its text or messages (logged only with log_prompts)
    error: str | None = None  # why it was refused or failed


class Metrics:
    """The counters of `engine`'s server and its audit log (`audit_log`: a jsonl file, appended;
    None: none). Thread-safe."""

    def __init__(
        self,
        engine: Engine,
        monitor: Monitor,
        *,
        audit_log: str | Path | None = None,
        log_prompts: bool = False,
    ):
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "esft_requests", "Completion requests by HTTP status.", ["model", "code"], registry=r
        )
        self._first_token = Histogram(
            "esft_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
            ["model"],
            buckets=_FIRST_TOKEN_S,
            registry=r,
        )
        self._per_token = Histogram(
            "esft_time_per_output_token_seconds",
            "Time per output token after the first.",
            ["model"],
            buckets=_PER_TOKEN_S,
            registry=r,
        )
        self._duration = Histogram(
            "esft_request_duration_seconds",
            "Time from a request's arrival to its last token.",
            ["model"],
            buckets=_TOTAL_S,
            registry=r,
        )
        Gauge("esft_queue_depth", "Requests waiting for a row.", registry=r).set_function(
            lambda: engine.queued
        )
        Gauge("esft_live_rows", "Rows decoding a request.", registry=r).set_function(
            lambda: engine.live
        )
        r.register(RoutingMetrics(monitor))
        self.log_prompts = log_prompts
        self._lock = threading.Lock()
        self._log = _open_log(Path(audit_log)) if audit_log else None

    def exposition(self) -> bytes:
        """/metrics' body."""
        return generate_latest(self.registry)

    def record(self, outcome: Outcome) -> None:
        """Count `outcome` and append its audit line."""
        model = outcome.model or ""
        self._requests.labels(model, str(outcome.code)).inc()
        if outcome.code == 200:
            self._duration.labels(model).observe(outcome.latency_s)
            if outcome.first_token_s is not None:
                self._first_token.labels(model).observe(outcome.first_token_s)
                if outcome.completion_tokens > 1:
                    after_first = outcome.latency_s - outcome.first_token_s
                    per_token = after_first / (outcome.completion_tokens - 1)
                    self._per_token.labels(model).observe(per_token)
        with self._lock:
            if self._log is not None:
                self._log.write(json.dumps(self._line(outcome)) + "\n")
                self._log.flush()

    def _line(self, o: Outcome) -> dict:
        v = o.verdict
        coverage = None if v is None else v.coverage or v.prompt_coverage
        line = {
            "time": time.time(),
            "adapter": o.model,
            "code": o.code,
            "error": o.error,
            "prompt_tokens": o.prompt_tokens,
            "completion_tokens": o.completion_tokens,
            "coverage": None if coverage is None else coverage.total,
            "per_layer": None if coverage is None else list(coverage.per_layer),
            "flagged": None if v is None else v.flagged,
            "fallback": None if v is None else v.served_by != v.adapter,
            "latency_s": o.latency_s,
        }
        if self.log_prompts and o.prompt is not None:
            line["prompt"] = o.prompt
        return line

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None


class RoutingMetrics:
    """The routing monitor's per-model statistics (Monitor.snapshot) as metric families, read
    each time /metrics is."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        snap = self.monitor.snapshot()
        for name, family, key, doc in _ROUTING:
            metric = family(name, doc, labels=["model"])
            for model, stats in snap["models"].items():
                if stats[key] is not None:  # a mean before the first request, a missing profile
                    metric.add_metric([model], stats[key])
            yield metric
        for name, key, doc in _ROUTING_LAYERS:
            metric = GaugeMetricFamily(name, doc, labels=["model", "layer"])
            for model, stats in snap["models"].items():
                for layer, value in zip(snap["layers"], stats[key] or []):
                    metric.add_metric([model, str(layer)], value)
            yield metric


_ROUTING = (  # (metric, family, snapshot key, help); requests by the model asked for
    ("esft_requests_flagged", CounterMetricFamily, "flagged", "Requests flagged out-of-domain."),
    ("esft_requests_fallback", CounterMetricFamily, "fallback", "Requests the base answered."),
    ("esft_prompt_tokens", CounterMetricFamily, "prompt_tokens", "Finished requests' prompts."),
    ("esft_completion_tokens", CounterMetricFamily, "completion_tokens", "Tokens generated."),
    (
        "esft_coverage_mean",
        GaugeMetricFamily,
        "coverage",
        "Mean share of gate mass on trained experts.",
    ),
    ("esft_coverage_profiled", GaugeMetricFamily, "profiled", "The adapter's own task's coverage."),
)
_ROUTING_LAYERS = (
    ("esft_coverage_layer_mean", "per_layer", "Mean coverage per MoE layer."),
    ("esft_coverage_layer_profiled", "profiled_per_layer", "Profiled coverage per MoE layer."),
)


def _open_log(path: Path):
    """`path` opened for appending (its directory created), or a one-line MonitorError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a", encoding="utf-8")
    except OSError as e:
        raise MonitorError(
            f"monitor.audit_log: {path}: cannot write the audit log ({e.strerror or e})"
        ) from None

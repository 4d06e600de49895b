"""Prometheus text for /metrics: HTTP requests by route and status, and, for every front,
generations by finish reason, tokens, the queue, and TTFT and decode-rate histograms."""
from __future__ import annotations

import threading
from collections import Counter
from typing import Any

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds: a Pi's long prompts reach 10 s
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)  # tokens per second


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {n}' for b, n in zip(self.bounds, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.total}"]


class Metrics:
    """Counters the HTTP front and the engine feed; rendered in Prometheus' text format 0.0.4."""

    def __init__(self) -> None:
        self._requests: Counter[tuple[str, int]] = Counter()
        self._refused: Counter[str] = Counter()
        self.connections = 0  # open HTTP connections, kept by the listener
        self._finished: Counter[str] = Counter()
        self._tokens: Counter[str] = Counter()
        self._ttft = Histogram(TTFT_BUCKETS)
        self._rate = Histogram(RATE_BUCKETS)
        self._lock = threading.Lock()

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self._requests[(route, status)] += 1

    def refused(self, reason: str) -> None:
        """A connection refused or closed by a limit: over the count, out of descriptors, too slow."""
        with self._lock:
            self._refused[reason] += 1

    def finished(self, outcome: Any) -> None:
        """An engine job's end (any front's): its finish reason, tokens and timings."""
        usage = getattr(outcome.last, "usage", None)
        with self._lock:
            if outcome.error is not None or outcome.waited_out or usage is None:
                self._finished["error" if outcome.error is not None else "cancelled"] += 1
                return
            self._finished[outcome.last.finish_reason] += 1
            self._tokens["prompt"] += usage.prompt_tokens
            self._tokens["cached_prompt"] += usage.cached_prompt_tokens
            self._tokens["completion"] += usage.completion_tokens
            self._ttft.observe(usage.ttft_s)
            if usage.completion_tokens > 1:
                self._rate.observe(usage.decode_tokens_per_s)

    def render(self, waiting: int, busy: bool) -> str:
        with self._lock:
            lines = _family("edgellm_http_requests_total", "counter", "HTTP requests by route and status.",
                            [f'{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self._requests.items())])
            lines += _family("edgellm_http_connections_refused_total", "counter",
                             "HTTP connections refused or closed by a limit, by reason (connections: over "
                             "--http-max-connections or one address's share; descriptors: none left; accept: "
                             "another accept error; slow: a request not all there within --http-read-timeout).",
                             [f'{{reason="{r}"}} {n}' for r, n in sorted(self._refused.items())])
            lines += _family("edgellm_http_connections", "gauge", "Open HTTP connections.", [f" {self.connections}"])
            lines += _family("edgellm_generations_total", "counter", "Generations by finish reason, every front.",
                             [f'{{finish_reason="{k}"}} {n}' for k, n in sorted(self._finished.items())])
            lines += _family("edgellm_tokens_total", "counter", "Prompt, cached prompt and completion tokens.",
                             [f'{{kind="{k}"}} {n}' for k, n in sorted(self._tokens.items())])
            lines += _family("edgellm_queue_waiting", "gauge", "Requests waiting for the model.", [f" {waiting}"])
            lines += _family("edgellm_busy", "gauge", "1 while a generation runs.", [f" {int(busy)}"])
            lines += ["# HELP edgellm_ttft_seconds Time from the request to the first token.",
                      "# TYPE edgellm_ttft_seconds histogram", *self._ttft.lines("edgellm_ttft_seconds")]
            lines += ["# HELP edgellm_decode_tokens_per_second Decode rate after the first token.",
                      "# TYPE edgellm_decode_tokens_per_second histogram",
                      *self._rate.lines("edgellm_decode_tokens_per_second")]
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *(name + s for s in samples)]

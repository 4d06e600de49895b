"""Prometheus text for /metrics: HTTP requests by route and outcome, and the queue depth."""
from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    """Counters the HTTP front keeps; rendered in Prometheus' text format 0.0.4."""

    def __init__(self) -> None:
        self._requests: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self._requests[(route, status)] += 1

    def render(self, waiting: int) -> str:
        with self._lock:
            requests = sorted(self._requests.items())
        lines = ["# HELP edgellm_http_requests_total HTTP requests by route and status.",
                 "# TYPE edgellm_http_requests_total counter"]
        lines += [f'edgellm_http_requests_total{{route="{route}",status="{status}"}} {n}'
                  for (route, status), n in requests]
        lines += ["# HELP edgellm_queue_waiting Requests waiting for the model.",
                  "# TYPE edgellm_queue_waiting gauge", f"edgellm_queue_waiting {waiting}"]
        return "\n".join(lines) + "\n"

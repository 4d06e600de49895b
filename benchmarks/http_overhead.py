"""What the HTTP front adds before the first streamed token: issue 11's overhead bar.

    python benchmarks/http_overhead.py BUNDLE [--requests 50] [--threads 2] [--json out.json]

`edgellm serve BUNDLE --http` runs in a process of its own (client and server never share
a GIL); this process streams chat completions from it, one at a time, and takes the time
from sending the request to the first `data:` line, minus the model's own time to first
token for that request (the `usage.ttft_s` of the stream's last event, which runs from the
request reaching the engine to the first sampled token). Two clients: a raw socket that
writes the request in one segment (the server's own cost: the bar), and the `openai` package
as applications use it (its own request building and event parsing included). Progress on stderr; the table and PASS/FAIL lines on stdout.
A third row times whole requests kept alive on one connection (`GET /v1/models`, no model time):
what a client that reuses its connection waits beyond the first request (~44 ms before the
server set TCP_NODELAY, a delayed ACK each time).
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

BAR_MS = 5.0  # median first-byte overhead over the model's TTFT
PROMPT = [{"role": "user", "content": "The kitchen is 31 degrees. What should I do?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"edgellm serve exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"edgellm serve did not listen on {port} within {timeout:.0f} s")


@contextlib.contextmanager
def serve_http(bundle: Path, threads: int) -> Iterator[int]:
    """`edgellm serve BUNDLE --http` in a process of its own, listening; yields its port."""
    port = free_port()
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", str(bundle), "--http", f"127.0.0.1:{port}",
           "--threads", str(threads)]
    report.stage(" ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        wait_ready(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def raw_stream(port: int, body: dict[str, Any]) -> tuple[float, float]:
    """(seconds to the first data line, the model's TTFT) over one socket write."""
    payload = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        s.sendall(head + payload)
        data, first = b"", None
        while chunk := s.recv(65536):
            data += chunk
            if first is None and b"data:" in data:
                first = time.perf_counter() - started
    events = [json.loads(line[5:]) for line in data.decode().splitlines()
              if line.startswith("data:") and line.strip() != "data: [DONE]"]
    return first, next(e["usage"]["ttft_s"] for e in reversed(events) if e.get("usage"))


def openai_stream(client: Any, body: dict[str, Any]) -> tuple[float, float]:
    started, first, ttft = time.perf_counter(), None, None
    for event in client.chat.completions.create(**body):
        first = first or time.perf_counter() - started
        if event.usage is not None:
            ttft = event.usage.model_extra.get("ttft_s")
    return first, ttft


def keep_alive(port: int, n: int) -> dict[str, Any]:
    """Milliseconds per GET on one kept-alive connection, the first (the connect) left out."""
    report.stage(f"keep-alive: {n} requests on one connection")
    conn = http.client.HTTPConnection("127.0.0.1", port)
    times = []
    for i in range(n + 1):
        started = time.perf_counter()
        conn.request("GET", "/v1/models")
        conn.getresponse().read()
        if i:
            times.append((time.perf_counter() - started) * 1000)
    conn.close()
    return {"median_ms": statistics.median(times), "p90_ms": statistics.quantiles(times, n=10)[-1], "n": n}


def measure(name: str, call: Callable[[], tuple[float, float]], n: int) -> dict[str, Any]:
    report.stage(f"{name}: {n} streamed requests")
    call()  # warm-up
    overheads = []
    for _ in range(n):
        first, ttft = call()
        overheads.append((first - ttft) * 1000)
    return {"median_ms": statistics.median(overheads), "p90_ms": statistics.quantiles(overheads, n=10)[-1],
            "n": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    machine = report.machine_info()
    report.warn_if_busy(machine)
    with serve_http(args.bundle, args.threads) as port:
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        body = {"model": client.models.list().data[0].id, "messages": PROMPT, "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}}
        results = {"raw socket": measure("raw socket", lambda: raw_stream(port, body), args.requests),
                   "openai client": measure("openai client", lambda: openai_stream(client, body), args.requests)}
        results["keep-alive GET"] = keep_alive(port, args.requests)
    lines = [f"{'client':16} {'median ms':>10} {'p90 ms':>8}  (first data line minus the model's TTFT; "
             "keep-alive: a whole GET)"]
    lines += [f"{k:16} {v['median_ms']:10.2f} {v['p90_ms']:8.2f}" for k, v in results.items()]
    # The bar is the server's: the first byte on the wire. The openai client's row adds its own
    # request building and event parsing, which no server can remove.
    checks = [report._bar(f"first streamed byte <= {BAR_MS:g} ms after the model's TTFT (median, raw socket)",
                          results["raw socket"]["median_ms"], BAR_MS, False, " ms"),
              report._bar(f"a kept-alive request <= {BAR_MS:g} ms (median, GET /v1/models)",
                          results["keep-alive GET"]["median_ms"], BAR_MS, False, " ms")]
    report.emit({"machine": machine, "bundle": str(args.bundle), "results": results, "bars": checks},
                "\n".join(lines), report.bar_lines(checks), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 19's HTTP attacks, items 1-7, against a real `edgellm serve --http` on SmolLM2, its RSS
sampled, /health timed while the slow ones run.

The service runs in a process of its own with its file descriptor limit lowered (so about a
hundred sockets exhaust it, not 1,100), a 1 s read timeout, and its log in a file that must
stay a few lines long. Each attack checks its own answer; the last test checks memory and the
log over the whole set, so run the module whole.
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest

pytestmark = pytest.mark.timeout(300)

FD_LIMIT = 96  # the service starts with about 10 open
MAX_CONNECTIONS = 40  # 10 per client address
READ_TIMEOUT = 1.0
ASK = [{"role": "user", "content": "Hello"}]
WARM_UP = {"type": "object", "properties": {"s": {"type": "string", "pattern": "[a-z]+"}}, "required": ["s"]}


class Service:
    def __init__(self, process: subprocess.Popen, port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log = log
        self.ps = psutil.Process(process.pid)
        self.baseline = 0
        self.peak = 0

    def rss(self) -> int:
        value = self.ps.memory_info().rss
        self.peak = max(self.peak, value)
        return value

    def post(self, path: str, body: Any, timeout: float = 60, **kw: Any) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json", **kw.pop("headers", {})}
        response = httpx.post(self.url + path, content=content, headers=headers, timeout=timeout, **kw)
        self.rss()
        return response


@pytest.fixture(scope="module")
def service(smollm2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", str(smollm2_bundle), "--http", "127.0.0.1:0",
           "--http-read-timeout", str(READ_TIMEOUT), "--http-max-connections", str(MAX_CONNECTIONS),
           "--max-tokens", "64", "--threads", "1"]

    def lower_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    with log.open("w") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=sink, preexec_fn=lower_fd_limit,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"over HTTP at http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        service = Service(process, int(found.group(1)), log)
        for warm_up in ({}, {"grammar": {"type": "regex", "value": "[a-z]{1,8}"}},
                        {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WARM_UP}}}):
            response = service.post("/v1/chat/completions", {"messages": ASK, "max_tokens": 4, **warm_up})
            assert response.status_code == 200, response.text  # llguidance's tokenizer is loaded once: not growth
        service.baseline = service.rss()
        yield service
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def responsive(service: Service, limit_s: float = 1.0) -> Iterator[None]:
    """/health, asked every 0.1 s from another thread while the block runs, answers in under `limit_s`."""
    stop = threading.Event()
    times: list[float] = []

    def poll() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                ok = httpx.get(service.url + "/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                ok = False
            times.append(time.monotonic() - started if ok else float("inf"))
            service.rss()
            stop.wait(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        yield
    finally:
        stop.set()
        poller.join(15)
    assert times and max(times) < limit_s, f"/health took up to {max(times):.2f} s ({len(times)} polls)"


def error_text(response: httpx.Response) -> str:
    error = response.json()["error"]
    return error if isinstance(error, str) else error["message"]


# -- 1. grammars whose lexer explodes: refused, and nothing of them kept ------------------------------

def test_1_exploding_regex_grammars_are_refused_and_not_kept(service):
    before = service.rss()  # each kept matcher was ~157 MiB: ten took the service from 368 to 2,058 MiB
    with responsive(service):
        for n in range(1000, 990, -1):
            response = service.post("/v1/chat/completions", {"messages": ASK, "max_tokens": 4, "grammar": {
                "type": "regex", "value": f"(x{{1000}}){{{n}}}"}})
            assert response.status_code == 400, response.text[:300]
        for n in range(1000, 997, -1):
            schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": f"(x{{1000}}){{{n}}}"}},
                      "required": ["s"]}
            response = service.post("/v1/chat/completions", {"messages": ASK, "max_tokens": 16, "response_format": {
                "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
            assert response.status_code in (200, 400), response.text[:300]  # what counts: nothing of it kept
    time.sleep(0.5)
    assert (service.rss() - before) / 2**20 < 50


# -- 2. huge invalid schemas: refused without freezing other clients ----------------------------------

def _invalid_schema(properties: int) -> dict[str, Any]:
    props: dict[str, Any] = {f"p{i}": {"type": "string"} for i in range(properties)}
    props[f"p{properties // 2}"] = {"type": "array", "items": {"type": "integer"}, "minItems": 5, "maxItems": 2}
    return {"type": "object", "properties": props}


def test_2_huge_invalid_schemas_do_not_freeze_health(service):
    big, half = _invalid_schema(16_000), _invalid_schema(8_000)
    tool = {"type": "function", "function": {"name": "f", "parameters": half}}
    with responsive(service):
        for path, body in (
                ("/v1/chat/completions", {"messages": ASK, "max_tokens": 4, "response_format": {
                    "type": "json_schema", "json_schema": {"name": "s", "schema": big}}}),
                ("/api/chat", {"messages": ASK, "stream": False, "format": half, "options": {"num_predict": 4}}),
                ("/v1/chat/completions", {"messages": ASK, "max_tokens": 4, "tools": [tool], "tool_choice": "required"})):
            response = service.post(path, body)
            assert response.status_code == 400, (path, response.text[:300])


# -- 3. idle and slow connections, more than the descriptor limit ---------------------------------------

def test_3_idle_sockets_beyond_the_descriptor_limit_do_not_take_the_front_down(service):
    held: list[socket.socket] = []
    with responsive(service):
        for i in range(150):  # from two addresses: ten each are held, the rest answered 503
            sock = socket.socket()
            sock.bind((f"127.0.0.{2 + i % 2}", 0))
            sock.settimeout(5)
            try:
                sock.connect(("127.0.0.1", service.port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        slow = socket.create_connection(("127.0.0.1", service.port))  # headers a byte at a time
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaa":
            try:
                slow.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        assert service.post("/v1/chat/completions", {"messages": ASK, "max_tokens": 2}).status_code == 200
        time.sleep(READ_TIMEOUT + 1)
    still_open = sum(_still_open(sock) for sock in [*held, slow])
    assert still_open == 0, f"{still_open} idle connections still open after the read timeout"


def _still_open(sock: socket.socket) -> bool:
    """Whether the server left `sock` open (it sent a 503 and closed, or closed it, or reset it otherwise)."""
    sock.settimeout(0.1)
    try:
        while sock.recv(4096):
            pass
        return False
    except socket.timeout:
        return True
    except OSError:
        return False
    finally:
        sock.close()


def test_3_malformed_and_upgrade_requests_neither_log_nor_keep_a_connection(service):
    for i in range(300):
        with socket.create_connection(("127.0.0.1", service.port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                         if i % 2 else b"\x16\x03\x01 not http at all\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 ")
    time.sleep(0.3)
    metrics = dict(line.rsplit(" ", 1) for line in httpx.get(service.url + "/metrics").text.splitlines()
                   if not line.startswith("#"))
    assert metrics["edgellm_http_connections"] == "1"  # this one: no upgraded connection left uncounted


# -- 4. another client's prompt read through the prefix cache ------------------------------------------

def test_4_the_prefix_cache_tells_nothing_of_another_clients_prompt(service):
    def ask(source: str, code: str) -> int:
        system = f"You are the plant assistant. The door code is {code}. Never tell anyone the door code."
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=60) as client:
            response = client.post(service.url + "/v1/chat/completions", json={"max_tokens": 1, "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": "Hello"}]})
        response.raise_for_status()
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached = {}
    for guess in ("4821", "4822", "5555", "0000"):
        ask("127.0.0.1", "4821")  # the victim's request is the one cached before each guess
        cached[guess] = ask("127.0.0.2", guess)
    assert len(set(cached.values())) == 1, f"cached tokens per guess: {cached}"


# -- 5. browsers -----------------------------------------------------------------------------------------

def test_5_a_web_page_cannot_drive_the_model(service):
    body = json.dumps({"messages": ASK, "max_tokens": 2}).encode()
    plain = httpx.post(service.url + "/v1/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert plain.status_code == 415
    rebound = service.post("/api/chat", {"messages": ASK, "stream": False}, headers={"host": "evil.example:8080"})
    assert rebound.status_code == 403 and "DNS rebinding" in error_text(rebound)
    cross = service.post("/v1/chat/completions", body, headers={"origin": "http://evil.example"})
    assert cross.status_code == 403 and "--http-allow-origin" in error_text(cross)


# -- 6. what used to be a 500 ----------------------------------------------------------------------------

def _with_call_arguments(arguments: str) -> dict[str, Any]:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return {"max_tokens": 2, "messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                                          {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}


def _nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


CLIENT_ERRORS = [
    ("nested brackets", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("nested brackets in tool-call arguments", _with_call_arguments("[" * 100_000 + "]" * 100_000)),
    # top-level for OpenAI, under options for Ollama: each route ignores the other's
    ("temperature 10**400", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1%s, '
                            b'"options": {"temperature": 1%s}}' % (b"0" * 400, b"0" * 400)),
    ("a 5,000-digit integer", b'{"messages": [{"role": "user", "content": "Hi"}], "seed": ' + b"7" * 5000 + b"}"),
    ("a lone surrogate in content", b'{"messages": [{"role": "user", "content": "Hi \\udc00"}], "max_tokens": 2}'),
    ("a schema nested 400 deep", {"messages": ASK, "max_tokens": 2, "response_format": {
        "type": "json_schema", "json_schema": {"name": "deep", "schema": _nested_schema(400)}}}),
]


@pytest.mark.parametrize("name, body", CLIENT_ERRORS, ids=[c[0] for c in CLIENT_ERRORS])
def test_6_client_errors_are_400_not_500(service, name, body):
    for path in ("/v1/chat/completions", "/api/chat"):
        response = service.post(path, body)
        assert response.status_code == 400, (name, path, response.text[:300])


# -- 7. the smaller ones -----------------------------------------------------------------------------------

def test_7_405_says_allow_and_a_megabyte_prompt_is_refused_before_the_queue(service):
    response = httpx.put(service.url + "/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    done = threading.Event()

    def stream() -> None:
        # A long prompt: its prefill outlasts the refusals even on an idle machine.
        long = [{"role": "user", "content": "Repeat after me: " + "word " * 1200}]
        body = {"messages": long, "max_tokens": 64, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", service.url + "/v1/chat/completions", json=body, timeout=60) as events:
            assert [line for line in events.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
        done.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(0.3)
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200_000}]}),
                       ("/api/generate", {"prompt": "x" * 1_000_000, "stream": False})):
        refused = service.post(path, body)
        assert refused.status_code == 400 and "context is" in error_text(refused), refused.text[:300]
    assert not done.is_set(), "the refusals waited for the running stream"
    streamer.join(60)
    assert done.is_set()


# -- the whole set -----------------------------------------------------------------------------------------

def test_memory_stayed_flat_and_the_log_short(service):
    """Last: RSS growth over every attack above, and the log they caused."""
    service.post("/v1/chat/completions", {"messages": ASK, "max_tokens": 2})
    time.sleep(0.5)  # the engine gives freed heap back once idle
    growth = (service.rss() - service.baseline) / 2**20
    # 32-51 MB over repeated runs on a 2-core machine (where glibc leaves freed arenas is timing); the
    # attacks this guards grew the service by 1.6 GB before they were bounded.
    assert growth < 64, f"RSS grew {growth:.0f} MB (peak +{(service.peak - service.baseline) / 2**20:.0f} MB)"
    log = service.log.read_text()
    assert "Traceback" not in log and "out of system resource" not in log, log[-3000:]
    assert len(log.splitlines()) < 40, f"{len(log.splitlines())} log lines:\n{log[-3000:]}"

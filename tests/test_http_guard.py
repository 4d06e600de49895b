"""The HTTP front against clients that misbehave (issue 19 items 3, 5, 6, 7): connections that
never finish a request or come in too many, web pages, bodies that break parsers, and the
smaller things (a lower-case bearer, 405's Allow, a huge prompt, TCP_NODELAY), each over a
real socket to a real uvicorn."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import ollama
import openai
import pytest

from edgellm.service.http import HttpConfig
from edgellm.service.http_server import HttpServer
from edgellm.service.http_guard import tenant_of_key
from http_helpers import Paced, serving

ASK = [{"role": "user", "content": "Hello there"}]
HEAD = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def connect(server, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(5)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (EOF, or a reset) within `seconds`, reading whatever it sends."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return False
    except ConnectionResetError:
        pass
    return True


def turned_away(sock: socket.socket) -> bool:
    """Whether a request on `sock` is answered 503 too_many_connections, or not at all (the
    connection closed or reset: the request crossed the server's close), rather than served."""
    answer = b""
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        while part := sock.recv(4096):
            answer += part
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return answer == b"" or answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer


def post(server, path: str, body: bytes | dict, headers: dict | None = None, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content,
                      headers={"content-type": "application/json", **(headers or {})}, timeout=30, **kw)


# -- item 3: read timeout and connection limit ------------------------------------------------------

@pytest.mark.parametrize("sent", [
    b"",  # connected, never a byte
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # headers never finished
    (HEAD + "Content-Length: 100\r\n\r\n{\"messages\":").encode(),  # body never finished
])
def test_a_request_that_never_arrives_in_full_is_closed(model, sent):
    with serving(model, read_timeout=0.5) as server:
        sock = connect(server)
        sock.sendall(sent)
        started = time.monotonic()
        assert closed_within(sock, 3), "the server kept a connection whose request never arrived"
        assert time.monotonic() - started < 2
        assert httpx.get(server.url + "/health").status_code == 200


def test_a_request_trickled_a_byte_at_a_time_is_closed_at_its_deadline(model):
    with serving(model, read_timeout=0.6) as server:
        sock = connect(server)
        started = time.monotonic()
        request = HEAD.encode() + b"X-Pad: " + b"a" * 200
        for i, byte in enumerate(request):
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
            assert time.monotonic() - started < 3, "a trickling client kept its connection"
        assert closed_within(sock, 3)


def test_a_keep_alive_connection_still_serves_requests_after_the_read_timeout(model):
    """The deadline runs while a request arrives, not while its answer is generated or between requests."""
    with serving(Paced(model, delay=0.1), read_timeout=0.5) as server, httpx.Client(base_url=server.url) as client:
        body = {"messages": ASK, "max_tokens": 8}  # 0.8 s of generation, longer than the read timeout
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        time.sleep(0.3)
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_a_request_pipelined_behind_an_answer_must_arrive_too(model):
    """The answer to the first request is not cut (it takes longer than the read timeout); the
    second request, its body never sent, then closes the connection at its deadline."""
    with serving(Paced(model, delay=0.1), read_timeout=0.5) as server:
        first = json.dumps({"messages": ASK, "max_tokens": 8}).encode()
        sock = connect(server)
        sock.sendall((HEAD + f"Content-Length: {len(first)}\r\n\r\n").encode() + first +
                     (HEAD + "Content-Length: 100\r\n\r\n{").encode())
        sock.settimeout(5)
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200") and b'"finish_reason":"length"' in received
        assert closed_within(sock, 3)


def _wait_open(server, count: int, timeout: float = 5.0) -> None:
    """Until the server counts exactly `count` open connections (a closed one leaves it a moment later)."""
    deadline = time.monotonic() + timeout
    while server.listener.open != count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.listener.open == count, f"{server.listener.open} connections open, expected {count}"


def test_connections_over_the_limits_are_refused_at_once_with_one_log_line(model, caplog):
    with serving(model, max_connections=8) as server:  # 2 per client address
        held = [connect(server, "127.0.0.2") for _ in range(2)]
        caplog.clear()
        with caplog.at_level(logging.WARNING, "edgellm.service"):
            for _ in range(20):  # the third connection of one address, twenty times
                assert turned_away(connect(server, "127.0.0.2"))
            assert httpx.get(server.url + "/health").status_code == 200  # another address is served
            # Its connection must be gone before counting to the limit: while the server still
            # held it, the count could reach 8 with the last held socket not yet accepted.
            _wait_open(server, 2)
            held += [connect(server, f"127.0.0.{3 + i // 2}") for i in range(6)]  # 8 held: the limit
            _wait_open(server, 8)
            assert turned_away(connect(server, "127.0.0.9"))
        lines = [r.getMessage() for r in caplog.records if "refusing connections" in r.getMessage()]
        assert len(lines) == 1, lines
        for sock in held:
            sock.close()
        time.sleep(0.2)
        metrics = dict(line.rsplit(" ", 1) for line in httpx.get(server.url + "/metrics").text.splitlines()
                       if not line.startswith("#"))
        assert metrics['edgellm_http_connections_refused_total{reason="connections"}'] == "21"


def test_running_out_of_descriptors_pauses_accepting_with_one_log_line(model, caplog):
    """asyncio's own accept loop logged a traceback per backlog slot and retry (627,852 in 40 s)."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with serving(model) as server:
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 40, hard))
        spare: list[int] = []
        try:
            with caplog.at_level(logging.WARNING, "edgellm.service"):
                while True:  # take every descriptor left, then give back ten for the clients
                    try:
                        spare.append(os.open(os.devnull, os.O_RDONLY))
                    except OSError:
                        break
                for fd in spare[-10:]:
                    os.close(fd)
                del spare[-10:]
                clients = [socket.socket() for _ in range(10)]  # the ten, before the server can take one
                for client in clients:
                    client.connect(("127.0.0.1", server.port))
                time.sleep(2.5)  # two retries of the paused accept, each failing again
                lines = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
                assert len(lines) == 1 and "trying again every 1 s" in lines[0], lines
        finally:
            for fd in spare:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for client in clients:  # waiting in the backlog, accepted once descriptors are back
            client.settimeout(10)
            client.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200"), "a waiting client was not served"
            client.close()


def test_accepted_connections_have_tcp_nodelay(model):
    """Without it a keep-alive response waited ~44 ms for a delayed ACK (0.5 ms with it)."""
    with serving(model) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/v1/models").status_code == 200
        (connection,) = server._server.server_state.connections
        sock = connection.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# -- item 5: browsers -------------------------------------------------------------------------------

def test_posts_must_be_declared_json(model):
    with serving(model) as server:
        body = json.dumps({"messages": ASK, "max_tokens": 2}).encode()
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             "application/json; charset=latin-1", ""):
            headers = {"content-type": content_type} if content_type else {}
            response = httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers)
            assert response.status_code == 415, (content_type, response.text)
            assert response.json()["error"]["code"] == "unsupported_media_type"
        assert httpx.post(server.url + "/api/chat", content=body, headers={"content-type": "text/plain"}
                          ).json() == {"error": "the body must be JSON: send 'Content-Type: application/json' "
                                                "(got 'text/plain')"}
        for content_type in ("application/json", "Application/JSON; charset=UTF-8", 'application/json;charset="utf-8"'):
            assert post(server, "/v1/chat/completions", body, {"content-type": content_type}).status_code == 200


def test_without_a_key_the_host_must_name_this_server(model):
    with serving(model, server_names=("edge.lan",)) as server:
        for host in ("127.0.0.1", f"127.0.0.1:{server.port}", "localhost:1", "[::1]:80", "edge.lan", "EDGE.LAN.",
                     "10.1.2.3", socket.gethostname()):
            assert httpx.get(server.url + "/v1/models", headers={"host": host}).status_code == 200, host
        for host in ("attacker.example", "attacker.example:8080", "127.0.0.1.nip.io", "edge.lan.attacker.example"):
            response = httpx.get(server.url + "/v1/models", headers={"host": host})
            assert response.status_code == 403 and response.json()["error"]["code"] == "host_not_allowed", host
    with serving(model, api_keys=("k3y",)) as server:  # a rebinding page cannot send the key
        headers = {"host": "attacker.example", "authorization": "Bearer k3y"}
        assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 200


def test_web_page_origins_are_refused_unless_allowed(model):
    with serving(model, allow_origins=("http://ha.local:8123",)) as server:
        body = {"messages": ASK, "max_tokens": 2}
        refused = post(server, "/v1/chat/completions", body, {"origin": "http://evil.example"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "origin_not_allowed"
        assert post(server, "/api/chat", body, {"origin": "null"}).status_code == 403
        allowed = post(server, "/v1/chat/completions", body, {"origin": "http://ha.local:8123"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://ha.local:8123"
        preflight = httpx.options(server.url + "/v1/chat/completions", headers={
            "origin": "http://ha.local:8123", "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization"})
        assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]
    with serving(model) as server:
        assert httpx.get(server.url + "/v1/models", headers={"origin": "http://ha.local:8123"}).status_code == 403


def test_a_non_loopback_address_without_a_key_is_warned_about(model, caplog):
    from edgellm.engine import Engine

    engine = Engine(model)
    with caplog.at_level(logging.WARNING, "edgellm.service"):
        HttpServer(engine, HttpConfig(host="0.0.0.0", port=0)).socket.close()
        HttpServer(engine, HttpConfig(host="0.0.0.0", port=0, api_keys=("k",))).socket.close()
        HttpServer(engine, HttpConfig(host="127.0.0.1", port=0)).socket.close()
    warnings = [r.getMessage() for r in caplog.records if "without an API key" in r.getMessage()]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0]


# -- item 6: bodies that break parsers ------------------------------------------------------------------

@pytest.mark.parametrize("body, says", [
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nest 100001 deep"),
    (b'{"x": ' + b"{\"a\": " * 150 + b"1" + b"}" * 150 + b', "messages": []}', "nest 151 deep"),
    (b'{"max_tokens": 1' + b"0" * 5000 + b', "messages": []}', "integer of 5001 digits"),
    (b'{"temperature": NaN, "messages": []}', "NaN is not valid JSON"),
    (b'{"messages": [], "messages": []}', "appears twice"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
])
def test_bodies_that_would_break_the_parser_are_400(model, body, says):
    with serving(model) as server:
        for path in ("/v1/chat/completions", "/api/chat"):
            response = post(server, path, body)
            assert response.status_code == 400, (path, response.text[:200])
            message = response.json()["error"]
            assert says in (message if isinstance(message, str) else message["message"])
        assert post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2}).status_code == 200


# -- item 7 and tenants ---------------------------------------------------------------------------------

def test_the_bearer_scheme_is_case_insensitive_and_every_key_of_the_file_works(model):
    paced = Paced(model, delay=0)
    with serving(paced, api_keys=("alpha-key", "beta-key")) as server:
        for authorization in ("bearer alpha-key", "BEARER beta-key", "Bearer  alpha-key"):
            response = post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2},
                            {"authorization": authorization})
            assert response.status_code == 200, authorization
        for authorization in ("Basic alpha-key", "Bearer gamma-key", "alpha-key", "Bearer alpha-key2"):
            assert httpx.get(server.url + "/v1/models", headers={"authorization": authorization}).status_code == 401
        tenants = [r["tenant"] for r in paced.requests]
        assert tenants == [tenant_of_key("alpha-key"), tenant_of_key("beta-key"), tenant_of_key("alpha-key")]
        assert tenant_of_key("alpha-key") != tenant_of_key("beta-key") and "alpha" not in tenant_of_key("alpha-key")


def test_without_keys_the_tenant_is_the_client_address_and_a_cache_salt_passes_through(model):
    paced = Paced(model, delay=0)
    with serving(paced) as server:
        for source in ("127.0.0.1", "127.0.0.2"):
            with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as client:
                client.post(server.url + "/api/generate", json={"prompt": "Hi", "stream": False, "cache_salt": source,
                                                               "options": {"num_predict": 2}}).raise_for_status()
        assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "cache_salt": "s1"}).status_code == 200
        assert [(r["tenant"], r.get("cache_salt")) for r in paced.requests] == [
            ("addr:127.0.0.1", "127.0.0.1"), ("addr:127.0.0.2", "127.0.0.2"), ("addr:127.0.0.1", "s1")]


def test_405_says_which_methods_are_allowed(model):
    with serving(model) as server:
        for path, allow in (("/v1/chat/completions", {"POST"}), ("/api/tags", {"GET", "HEAD"}),
                            ("/api/show", {"POST"})):
            response = httpx.delete(server.url + path)
            assert response.status_code == 405, path
            assert set(response.headers["allow"].replace(" ", "").split(",")) == allow, path


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_the_queue(model):
    """A 1 MB prompt used to wait its turn and then stall the worker tokenizing it: now it is
    refused at once, while another client's stream runs on."""
    paced = Paced(model, delay=0.05)
    with serving(paced, max_body=3 << 20) as server:
        streamed: list[float] = []

        def stream() -> None:
            body = {"messages": ASK, "max_tokens": 60, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
                streamed.extend(time.monotonic() for line in response.iter_lines() if line.startswith("data: "))

        runner = threading.Thread(target=stream)
        runner.start()
        time.sleep(0.5)
        started = time.monotonic()
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200_000}]}),
                           ("/v1/completions", {"prompt": "word " * 200_000}),
                           ("/api/generate", {"prompt": "word " * 200_000, "stream": False})):
            response = post(server, path, body)
            assert response.status_code == 400 and "context is" in response.text, response.text[:300]
        assert not paced.done.is_set(), "the refusals waited for the stream to end"
        refused_in = time.monotonic() - started
        runner.join(30)
        assert refused_in < 2 and streamed[-1] > started + refused_in  # the stream ran on
    assert model.max_context < 200_000 * 5 / model.tokenizer.bytes_per_token  # the bound applies to this model


def test_serve_reads_every_key_of_the_file_and_the_http_options(tmp_path):
    from edgellm.cli.main import build_parser
    from edgellm.cli.commands import _apply_config, _http_config

    keys = tmp_path / "keys"
    keys.write_text("# plant gateways\nfirst-key\n\n  second-key  \n# retired: old-key\nfirst-key\n")
    args = build_parser().parse_args(["serve", "b", "--http", ":8080", "--api-key-file", str(keys),
                                      "--http-allow-origin", "https://a.example/,https://b.example",
                                      "--http-allow-origin", "http://c.example:81", "--http-server-name", "edge.lan.",
                                      "--http-max-connections", "10", "--http-read-timeout", "2.5"])
    config = _http_config(args)
    assert config.api_keys == ("first-key", "second-key")
    assert config.allow_origins == ("https://a.example", "https://b.example", "http://c.example:81")
    assert (config.server_names, config.max_connections, config.read_timeout) == (("edge.lan",), 10, 2.5)
    toml = tmp_path / "serve.toml"
    toml.write_text('[serve]\nhttp = ":8080"\nhttp_allow_origin = ["https://x.example"]\nhttp_read_timeout = 3\n')
    args = build_parser().parse_args(["serve", "b", "--config", str(toml)])
    _apply_config(args)
    assert (_http_config(args).allow_origins, _http_config(args).read_timeout) == (("https://x.example",), 3)
    keys.write_text("# no key yet\n\n")
    for argv, says in ((["--http", ":1", "--api-key-file", str(keys)], "no key in it"),
                       (["--http-allow-origin", "*"], "only with --http"),
                       (["--http", ":1", "--http-read-timeout", "0"], "at least 0.1")):
        with pytest.raises(ValueError, match=says):
            _http_config(build_parser().parse_args(["serve", "b", *argv]))

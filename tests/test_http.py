"""The HTTP front's own behaviour: bad bodies, the key, busy, disconnects, and `edgellm serve --http`
next to MQTT on one engine."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import ollama
import openai
import pytest

from edgellm.service.broker import find_mosquitto
from http_helpers import Paced, serving
from mqtt_helpers import Gated, Probe, connection

ASK = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(model):
    with serving(model, max_body=4000) as server:
        yield server


def post(server, path: str, body: bytes | dict, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30,
                      **kw)


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": "Hello"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": ASK, "temperature": "hot"}, "temperature"),
    ({"messages": ASK, "max_tokens": 0}, "max_tokens"),
    ({"messages": ASK, "stop": ["a"] * 9}, "stop"),
    ({"messages": ASK, "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
])
def test_bad_bodies_get_400_and_the_server_keeps_serving(server, body, param):
    error = openai_error(post(server, "/v1/chat/completions", body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    ok = post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_limits_routes_and_ollama_errors(server):
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert openai_error(post(server, "/v1/chat/completions", big), 413)["code"] == "too_large"
    assert post(server, "/api/chat", big).status_code == 413
    assert openai_error(httpx.get(server.url + "/v1/nothing"), 404)["code"] == "not_found"
    assert openai_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    for path, status in (("/api/nothing", 404), ("/api/chat", 400)):
        response = post(server, path, b"{oops")
        assert response.status_code == status and set(response.json()) == {"error"}, response.text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_the_api_key_is_enforced(model, tmp_path):
    with serving(model, api_keys=("k3y-1234",)) as server:
        base = f"{server.url}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        with pytest.raises(ollama.ResponseError) as anonymous:
            ollama.Client(host=server.url).list()
        assert anonymous.value.status_code == 401
        assert openai.OpenAI(base_url=base, api_key="k3y-1234", max_retries=0).models.list().data
        keyed = ollama.Client(host=server.url, headers={"Authorization": "Bearer k3y-1234"})
        assert keyed.list().models
        assert httpx.get(server.url + "/health").status_code == 200  # for liveness probes


def test_a_full_queue_is_429_with_retry_after(model):
    gated = Gated(model)
    with serving(gated, queue_size=1) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0, timeout=30)
        answers = []

        def ask() -> None:
            answers.append(client.chat.completions.create(model=model.manifest.name, messages=ASK, max_tokens=3))

        threads = [threading.Thread(target=ask) for _ in range(2)]
        threads[0].start()
        assert gated.started.wait(10)
        threads[1].start()
        deadline = time.monotonic() + 10
        while server.engine.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as busy:
            client.chat.completions.create(model=model.manifest.name, messages=ASK, max_tokens=3)
        assert busy.value.response.headers["retry-after"] == "1" and "queue is full" in busy.value.message
        gated.gate.set()
        for t in threads:
            t.join(30)
    assert [a.choices[0].finish_reason for a in answers] == ["length", "length"]


def test_a_disconnect_stops_generation_at_the_next_token(model):
    paced = Paced(model, delay=0.05)
    with serving(paced) as server:
        body = {"messages": ASK, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            at_close = paced.chunks
        assert paced.done.wait(10)
        assert paced.last.finish_reason == "cancelled" and paced.chunks - at_close <= 1, (paced.chunks, at_close)
        # a client that gives up on a whole answer cancels it too
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/api/chat", json={"messages": ASK, "stream": False,
                                                       "options": {"num_predict": 200}}, timeout=0.3)
        assert paced.done.wait(10) and paced.last.finish_reason == "cancelled"
        assert time.monotonic() - started < 2 and paced.last.usage.completion_tokens < 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)")
@pytest.mark.timeout(120)
def test_serve_answers_http_and_mqtt_from_one_process(tiny_bundle, broker, tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    port = _free_port()
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", str(tiny_bundle), "--broker", broker.url,
           "--device-id", "both", "--http", f"127.0.0.1:{port}", "--api-key-file", str(key), "--queue-size", "4"]
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    probe = Probe(connection(broker.url), "probe-both", topics=("edgellm/both/#",))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret", max_retries=0)
        answer = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK, max_tokens=3)
        assert answer.choices[0].finish_reason == "length"
        probe.wait(lambda m: m.topic == "edgellm/both/status" and b"online" in m.payload, timeout=30)
        probe.publish("edgellm/both/request", {"id": "m1", "prompt": "Hi", "max_tokens": 3})
        final = probe.replies("m1", timeout=30)[-1]
        assert final["done"] and final["finish_reason"] == "length"
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        probe.close()
    assert process.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in err and "s3cret" not in err


def test_metrics_count_requests_tokens_and_timings(model):
    with serving(model) as server:
        assert post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 4}).status_code == 200
        assert post(server, "/v1/chat/completions", b"{bad").status_code == 400
        assert post(server, "/api/generate", {"prompt": "Hi", "raw": True, "stream": False,
                                              "options": {"num_predict": 3}}).status_code == 200
        text = httpx.get(server.url + "/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples['edgellm_http_requests_total{route="/v1/chat/completions",status="200"}'] == "1"
    assert samples['edgellm_http_requests_total{route="/v1/chat/completions",status="400"}'] == "1"
    assert samples['edgellm_generations_total{finish_reason="length"}'] == "2"
    assert samples['edgellm_tokens_total{kind="completion"}'] == "7"
    assert samples['edgellm_ttft_seconds_count'] == samples['edgellm_ttft_seconds_bucket{le="+Inf"}'] == "2"
    assert samples['edgellm_decode_tokens_per_second_count'] == "2" and samples["edgellm_queue_waiting"] == "0"

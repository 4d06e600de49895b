"""The in-process Python broker (amqtt): the fallback that lets `edgellm serve` run with nothing installed.

amqtt speaks MQTT 3.1.1 only, so these tests check what the service needs of 3.1.1 on it:
reply_to routing, QoS 1, retained status, Last Will, persistent sessions.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgellm.service import protocol as proto
from edgellm.service.broker import BROKER_ENV, MOSQUITTO, PYTHON, BrokerError, embedded_kind, port_is_free
from edgellm.service.client import ask
from mqtt_helpers import Probe, check_status_lifecycle, connection, payload, running_service

pytest.importorskip("amqtt", reason='amqtt is not installed (pip install "edgellm[broker]")')
pytestmark = pytest.mark.timeout(60)

from edgellm.service.amqtt_broker import PythonBroker  # noqa: E402 - after the skip

T = proto.Topics("edgellm", "dev1")
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def model(tiny_bundle):
    import edgellm

    return edgellm.load(tiny_bundle)


@pytest.fixture
def broker():
    with PythonBroker() as b:
        yield b


def v311(url: str):
    return connection(url, mqtt_version="3.1.1")


def check_stream(replies: list[dict], rid: str) -> dict:
    *chunks, final = replies
    assert final["done"] is True and final["id"] == rid, final
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["delta"] for c in chunks) == final["text"]
    return final


def test_request_streams_chunks_then_final_to_reply_to_over_311(broker, model):
    device = Probe(v311(broker.url), topics=("dev/answers",))
    try:
        with running_service(model, v311(broker.url)):
            device.publish(T.request, {"id": "r1", "prompt": "Hello there", "max_tokens": 8, "reply_to": "dev/answers"})
            replies = device.replies("r1")
    finally:
        device.close()
    final = check_stream(replies, "r1")
    expected = model.generate("Hello there", max_new_tokens=8)
    assert (final["text"], final["finish_reason"]) == (expected.text, expected.finish_reason)
    assert len(replies) > 1, "no chunks before the final reply"


def test_ask_falls_back_to_311_when_the_broker_refuses_v5(broker, model, caplog):
    with running_service(model, v311(broker.url)), caplog.at_level(logging.WARNING, logger="edgellm.service"):
        replies = list(ask(connection(broker.url), T, {"id": "a1", "prompt": "Hi", "max_tokens": 4}, 10,
                           downgrade=True))
        assert check_stream(replies, "a1")["text"] == model.generate("Hi", max_new_tokens=4).text
        assert any("refuses MQTT 5" in r.getMessage() for r in caplog.records)
        # Asked for v5 explicitly: a one-line refusal that says what to do, no silent downgrade.
        from edgellm.errors import RequestError

        with pytest.raises(RequestError, match=r"unsupported protocol version.*--mqtt-version 3\.1\.1"):
            list(ask(connection(broker.url), T, {"id": "a2", "prompt": "Hi"}, 10))


def test_requests_sent_while_the_service_is_down_wait_in_its_persistent_session(broker, model):
    device = Probe(v311(broker.url), topics=(T.response("#"),))
    try:
        with running_service(model, v311(broker.url), client_id="svc-a"):
            pass  # the first connection creates the session and its subscription
        device.publish(T.request, {"id": "late", "prompt": "Hi", "max_tokens": 3})
        with running_service(model, v311(broker.url), client_id="svc-a") as service:
            check_stream(device.replies("late"), "late")
            assert service.connected.is_set()
    finally:
        device.close()


def test_status_is_retained_and_the_last_will_marks_a_killed_service_offline(broker, tiny_bundle):
    status = "edgellm/killme/status"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm.cli", "serve", str(tiny_bundle), "--broker", broker.url,
         "--mqtt-version", "3.1.1", "--device-id", "killme"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    online = check_status_lifecycle(lambda: v311(broker.url), status, proc)
    assert online["capabilities"]["mqtt_version"] == "3.1.1"


def _stderr_lines(proc: subprocess.Popen) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_line(lines: queue.Queue[str], pattern: str, timeout: float = 30.0) -> re.Match:
    seen = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line matching {pattern!r} in: {seen}") from None
        seen.append(line)
        if match := re.search(pattern, line):
            return match


def test_serve_without_broker_falls_back_to_python_and_ask_finds_it(tiny_bundle, model, capsys, caplog):
    env = {**os.environ, BROKER_ENV: PYTHON}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm.cli", "serve", str(tiny_bundle), "--device-id", "fb"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = _stderr_lines(proc)
        started = _wait_line(lines, r"in-process Python broker \(amqtt\) at (mqtt://127\.0\.0\.1:\d+).*"
                                    r"MQTT 5 is unavailable on it, so the service speaks 3\.1\.1")
        url = started.group(1)
        _wait_line(lines, r"connected to .* requests on edgellm/fb/request")
        watcher = Probe(v311(url), "watcher", topics=("edgellm/fb/status",))
        online = payload(watcher.wait(lambda m: payload(m).get("state") == "online"))
        watcher.close()
        assert online["state"] == "online" and online["capabilities"]["mqtt_version"] == "3.1.1"
        from edgellm.cli import main

        with caplog.at_level(logging.WARNING, logger="edgellm.service"):
            rc = main(["ask", "--broker", url, "--device-id", "fb", "-n", "6", "--raw", "Hello there"])
        assert rc == 0
        assert capsys.readouterr().out == model.generate("Hello there", max_new_tokens=6).text + "\n"
        assert any("asking over 3.1.1" in r.getMessage() for r in caplog.records)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("option, message", [
    (["--mqtt-version", "5"], "--mqtt-version 5: the in-process Python broker .* speaks MQTT 3.1.1 only"),
    (["--shared-group", "g"], "--shared-group: the in-process Python broker .* has no shared subscriptions"),
])
def test_what_the_python_broker_lacks_is_a_one_line_error_before_loading(monkeypatch, capsys, option, message):
    from edgellm.cli import main

    monkeypatch.setenv(BROKER_ENV, PYTHON)
    rc = main(["serve", "no-such-bundle", *option])  # the bundle is never opened: the check comes first
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and re.search(message, err), err


def test_embedded_kind_prefers_mosquitto_falls_back_to_python_and_obeys_the_env(monkeypatch):
    monkeypatch.delenv(BROKER_ENV, raising=False)
    monkeypatch.setattr("edgellm.service.broker.find_mosquitto", lambda: "/usr/sbin/mosquitto")
    assert embedded_kind() == MOSQUITTO
    monkeypatch.setenv(BROKER_ENV, "Python")
    assert embedded_kind() == PYTHON
    monkeypatch.setenv(BROKER_ENV, "rabbit")
    with pytest.raises(BrokerError, match="EDGELLM_BROKER='rabbit': expected mosquitto or python"):
        embedded_kind()
    monkeypatch.delenv(BROKER_ENV)
    monkeypatch.setattr("edgellm.service.broker.find_mosquitto", lambda: None)
    assert embedded_kind() == PYTHON
    monkeypatch.setenv(BROKER_ENV, MOSQUITTO)
    with pytest.raises(BrokerError, match="install mosquitto"):
        embedded_kind()
    monkeypatch.delenv(BROKER_ENV)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "amqtt" else find_spec(name, *a))
    with pytest.raises(BrokerError, match=r'install mosquitto.*pip install "edgellm\[broker\]"'):
        embedded_kind()


def test_python_broker_stops_cleanly_and_reports_a_taken_port():
    with PythonBroker() as b:
        p = Probe(v311(b.url))
        p.close()
        port = b.port
        assert not port_is_free(port)
        with pytest.raises(BrokerError, match=f"amqtt did not start on 127.0.0.1:{port}"):
            PythonBroker(port).start()
    assert not [t for t in threading.enumerate() if t.name == "edgellm-amqtt"]
    with PythonBroker(port):  # stopped for real: the same port serves again
        Probe(v311(f"mqtt://127.0.0.1:{port}")).close()

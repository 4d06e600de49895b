"""The embedded brokers of `edgellm serve`.

The in-process Python broker (amqtt) is the fallback that lets `edgellm serve` run with nothing
installed. amqtt speaks MQTT 3.1.1 only, so these tests check what the service needs of 3.1.1 on
it: reply_to routing, QoS 1, retained status, Last Will, persistent sessions.

The embedded mosquitto must not outlive a killed `edgellm serve`, nor keep its port from the next.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from edgellm.service import protocol as proto
from edgellm.runtime.ownership import cmdline, pid_running
from edgellm.service import broker as broker_module
from edgellm.service.broker import (BROKER_ENV, MOSQUITTO, OWNER, PID_FILE, PYTHON, BrokerError, embedded_kind,
                                    find_mosquitto, free_port, port_is_free, start_embedded)
from edgellm.service.client import ask
from mqtt_helpers import Probe, check_status_lifecycle, connection, payload, running_service

pytestmark = pytest.mark.timeout(60)
needs_amqtt = pytest.mark.skipif(importlib.util.find_spec("amqtt") is None,
                                 reason='amqtt is not installed (pip install "edgellm[broker]")')
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


def python_broker(port: int = 0):
    """amqtt's broker, imported only by the tests that need it, so the mosquitto ones run without it."""
    from edgellm.service.amqtt_broker import PythonBroker

    return PythonBroker(port or free_port())

T = proto.Topics("edgellm", "dev1")
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def model(tiny_bundle):
    import edgellm

    return edgellm.load(tiny_bundle)


@pytest.fixture
def broker():
    with python_broker() as b:
        yield b


def v311(url: str):
    return connection(url, mqtt_version="3.1.1")


def check_stream(replies: list[dict], rid: str) -> dict:
    *chunks, final = replies
    assert final["done"] is True and final["id"] == rid, final
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["delta"] for c in chunks) == final["text"]
    return final


@needs_amqtt
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


@needs_amqtt
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


@needs_amqtt
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


@needs_amqtt
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


@needs_amqtt
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
        from edgellm.cli.main import main

        with caplog.at_level(logging.WARNING, logger="edgellm.service"):
            rc = main(["ask", "--broker", url, "--device-id", "fb", "-n", "6", "--raw", "Hello there"])
        assert rc == 0
        assert capsys.readouterr().out == model.generate("Hello there", max_new_tokens=6).text + "\n"
        assert any("going on over MQTT 3.1.1" in r.getMessage() for r in caplog.records)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


@needs_amqtt
@pytest.mark.parametrize("option, message", [
    (["--mqtt-version", "5"], "--mqtt-version 5: the in-process Python broker .* speaks MQTT 3.1.1 only"),
    (["--shared-group", "g"], "--shared-group: the in-process Python broker .* has no shared subscriptions"),
])
def test_what_the_python_broker_lacks_is_a_one_line_error_before_loading(monkeypatch, capsys, option, message):
    from edgellm.cli.main import main

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


@needs_amqtt
def test_python_broker_stops_cleanly_and_reports_a_taken_port():
    with python_broker() as b:
        p = Probe(v311(b.url))
        p.close()
        port = b.port
        assert not port_is_free(port)
        with pytest.raises(BrokerError, match=f"amqtt did not start on 127.0.0.1:{port}"):
            python_broker(port).start()
    assert not [t for t in threading.enumerate() if t.name == "edgellm-amqtt"]
    with python_broker(port):  # stopped for real: the same port serves again
        Probe(v311(f"mqtt://127.0.0.1:{port}")).close()


def test_a_taken_port_is_said_and_embedded_is_not_called_missing(caplog):
    """Port 1883 taken: one line says so before the broker takes another; `--broker embedded`
    is not logged as "no --broker given"."""
    from edgellm.cli.commands import _embedded_broker

    kind = embedded_kind()
    with closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="edgellm.service"), \
                closing(start_embedded(kind, port=port)) as b:
            assert b.port != port
        assert any(f"port {port} on 127.0.0.1 is taken" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgellm.service"), closing(_embedded_broker(kind, asked=True)):
        started = [r.getMessage() for r in caplog.records if "started" in r.getMessage()]
    assert len(started) == 1 and started[0].startswith("--broker embedded: started"), started


# -- the embedded mosquitto outlives no one ------------------------------------------------

# What `edgellm serve` does with no --broker, on a port of the test's choosing instead of 1883.
_OWNER = """
import sys, time
from edgellm.service import broker
if sys.argv[2] == "no-pdeathsig":
    broker._die_with_parent = lambda: None  # as on macOS, where prctl does not exist
b = broker.start_embedded(broker.MOSQUITTO, port=int(sys.argv[1]))
print(b.port, b.process.pid, b.workdir, flush=True)
time.sleep(120)
"""


def _start_owner(tmp_path: Path, port: int, mode: str = "") -> tuple[subprocess.Popen, int, Path]:
    """A process that starts the embedded mosquitto as `serve` does; -> (it, mosquitto's pid, its dir)."""
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(port), mode], cwd=ROOT, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE)
    got_port, pid, workdir = owner.stdout.readline().split()
    assert int(got_port) == port
    return owner, int(pid), Path(workdir)


def _is_our_mosquitto(pid: int, workdir: Path) -> bool:
    args = cmdline(pid)
    return pid_running(pid) and bool(args) and args[1:] == ["-c", str(workdir / "mosquitto.conf")]


def _kill_if_ours(owner: subprocess.Popen, pid: int, workdir: Path) -> None:
    owner.kill()
    owner.wait()
    owner.stdout.close()
    if _is_our_mosquitto(pid, workdir):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def runtime_in(tmp_path, monkeypatch):
    """Embedded brokers of this test under tmp_path, away from those of other runs on the machine."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@needs_mosquitto
@pytest.mark.skipif(broker_module._die_with_parent() is None, reason="no prctl(PR_SET_PDEATHSIG) here")
def test_mosquitto_dies_with_a_killed_owner_and_the_next_start_gets_its_port(runtime_in):
    port = free_port()
    owner, pid, workdir = _start_owner(runtime_in, port)
    try:
        assert _is_our_mosquitto(pid, workdir) and not port_is_free(port)
        assert os.getsid(pid) == pid, "mosquitto shares the terminal's Ctrl-C with the service"
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert _wait_gone(pid), "mosquitto outlived the process that started it"
        assert workdir.exists()  # SIGKILL ran no cleanup: the next start removes it
        with closing(start_embedded(MOSQUITTO, port=port)) as again:
            assert again.port == port
            assert not workdir.exists()
    finally:
        _kill_if_ours(owner, pid, workdir)


@needs_mosquitto
def test_a_mosquitto_left_running_is_stopped_at_the_next_start(runtime_in, caplog):
    port = free_port()
    owner, pid, workdir = _start_owner(runtime_in, port, "no-pdeathsig")
    try:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        time.sleep(0.3)
        assert _is_our_mosquitto(pid, workdir) and not port_is_free(port), "the orphan to clean up is missing"
        with caplog.at_level(logging.WARNING, logger="edgellm.service"), \
                closing(start_embedded(MOSQUITTO, port=port)) as again:
            assert again.port == port
            assert not pid_running(pid) and not workdir.exists()
        assert any(f"stopped mosquitto pid {pid}" in r.getMessage() for r in caplog.records)
    finally:
        _kill_if_ours(owner, pid, workdir)


@needs_mosquitto
def test_a_live_owners_broker_and_a_process_that_is_not_ours_are_left_alone(runtime_in):
    port = free_port()
    owner, pid, workdir = _start_owner(runtime_in, port)
    # A dead owner's directory whose pid file names a live process that is not our mosquitto
    # (the pid was reused): the directory goes, the process stays.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stranger = subprocess.Popen(["sleep", "60"])
    reused = broker_module.runtime_dir() / "mosquitto-reused"
    reused.mkdir()
    (reused / OWNER).write_text(f'{{"host": "{socket.gethostname()}", "pid": {int(dead.stdout)}, "start": null}}')
    (reused / PID_FILE).write_text(f"{stranger.pid}\n")
    try:
        with closing(start_embedded(MOSQUITTO, port=port)) as second:
            assert second.port != port  # the live owner's broker keeps it
            assert _is_our_mosquitto(pid, workdir) and workdir.exists()
            assert stranger.poll() is None and not reused.exists()
    finally:
        stranger.kill()
        stranger.wait()
        _kill_if_ours(owner, pid, workdir)


def test_the_brokers_directory_must_be_private(runtime_in):
    base = broker_module.runtime_dir()
    base.chmod(0o777)
    with pytest.raises(BrokerError, match=f"{re.escape(str(base))}: not a directory private to this user"):
        broker_module.runtime_dir()

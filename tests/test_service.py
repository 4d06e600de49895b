"""The MQTT service end to end: a real mosquitto, a real tiny model, devices played by paho clients."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgellm.service import protocol as proto
from edgellm.service.broker import BrokerError, Mosquitto, find_mosquitto
from edgellm.service.client import ask
from engine_helpers import Hooked
from mqtt_helpers import (Gated, Probe, check_status_lifecycle, connection, is_reply, load_schema, make_password_file, make_tls_files, payload,
                          running_service, schema_errors, start_broker)

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)"),
    pytest.mark.timeout(60),
]
T = proto.Topics("edgellm", "dev1")
ROOT = Path(__file__).parent.parent


def check_stream(replies: list[dict], rid: str) -> dict:
    """Chunks numbered from 0 that add up to the final text; returns the final reply."""
    *chunks, final = replies
    assert final["done"] is True and final["id"] == rid, final
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert "".join(c["delta"] for c in chunks) == final["text"]
    for c in chunks:
        assert schema_errors(c, load_schema("chunk")) == []
    assert schema_errors(final, load_schema("final")) == []
    return final


def test_request_streams_chunks_then_final(broker, probe, model):
    with running_service(model, connection(broker.url)):
        probe.publish(T.request, {"id": "r1", "prompt": "Hello there", "max_tokens": 8})
        final = check_stream(probe.replies("r1"), "r1")
    expected = model.generate("Hello there", max_new_tokens=8)
    assert final["text"] == expected.text and final["finish_reason"] == expected.finish_reason
    assert final["usage"]["completion_tokens"] == expected.usage.completion_tokens <= 8


def test_v5_response_topic_and_correlation_data(broker, probe, model):
    with running_service(model, connection(broker.url)):
        probe.publish(T.request, {"id": "r2", "prompt": "Hi", "max_tokens": 4, "stream": False},
                      response_topic="my/answers", correlation=b"\x00corr-7")
        msg = probe.wait(lambda m: is_reply(payload(m), "r2"))
    assert msg.topic == "my/answers"
    assert msg.properties.CorrelationData == b"\x00corr-7"
    assert payload(msg)["done"] is True  # stream false: the final reply only


def test_mqtt311_reply_to_and_default_topic(broker, model):
    conn = connection(broker.url, mqtt_version="3.1.1")
    p = Probe(conn)
    try:
        with running_service(model, conn):
            p.publish(T.request, {"id": "r3", "prompt": "Hi", "max_tokens": 4, "reply_to": "dev/answers"})
            p.publish(T.request, {"id": "r4", "prompt": "Hi", "max_tokens": 4})
            first = p.wait(lambda m: is_reply(payload(m), "r3"))
            second = p.wait(lambda m: is_reply(payload(m), "r4"))
        assert first.topic == "dev/answers" and second.topic == T.response("r4")
    finally:
        p.close()


def test_sentence_streaming_sends_whole_sentences(broker, probe, model):
    # Bias '.' and ' ' up so random weights still write several sentences.
    bias = {str(model.encode(s, add_special_tokens=False)[0]): b for s, b in ((".", 4), (" ", 6))}
    request = {"id": "r5", "prompt": "Tell me", "max_tokens": 60, "temperature": 1.0, "seed": 3,
               "logit_bias": bias, "stream": "sentence"}
    with running_service(model, connection(broker.url)):
        probe.publish(T.request, request)
        replies = probe.replies("r5")
    final = check_stream(replies, "r5")
    splitter = proto.SentenceSplitter()
    expected = splitter.feed(final["text"]) + [splitter.flush()]
    assert [c["delta"] for c in replies[:-1]] == [s for s in expected if s]
    assert len(replies) > 3, "too few sentences to tell sentence streaming from one chunk"


def test_bad_requests_get_their_code_and_the_next_request_is_answered(broker, probe, model):
    bad = [
        (b"{not json", None, proto.BAD_REQUEST),
        (json.dumps({"id": "b1", "prompt": "x", "temperature": "hot"}).encode(), "b1", proto.BAD_REQUEST),
        (json.dumps({"id": "b2", "prompt": "x", "colour": "red"}).encode(), "b2", proto.BAD_REQUEST),
        (json.dumps({"id": "b3", "prompt": ""}).encode(), "b3", proto.BAD_REQUEST),
        (json.dumps({"id": "b4", "prompt": "x" * 9000}).encode(), "b4", proto.TOO_LARGE),
        # valid on the wire, refused by the model: longer than the context
        (json.dumps({"id": "b5", "prompt": "word " * 1500}).encode(), "b5", proto.BAD_REQUEST),
        (b"\xff\xfe", None, proto.BAD_REQUEST),
    ]
    with running_service(model, connection(broker.url), max_payload=8000):
        for raw, rid, code in bad:
            probe.publish(T.request, raw)
            msg = probe.wait(lambda m: payload(m).get("status") == "error")
            data = payload(msg)
            assert (data["id"], data["error"]["code"]) == (rid, code), data
            assert msg.topic == (T.response(rid) if rid else T.errors)
            assert schema_errors(data, load_schema("error")) == []
        probe.publish(T.request, {"id": "ok", "prompt": "Hi", "max_tokens": 3})
        check_stream(probe.replies("ok"), "ok")


def test_queue_full_is_busy_and_queued_requests_still_run(broker, probe, model):
    gated = Gated(model)
    with running_service(gated, connection(broker.url), queue_size=1):
        probe.publish(T.request, {"id": "q1", "prompt": "Hi", "max_tokens": 3})
        assert gated.started.wait(5)
        probe.publish(T.request, {"id": "q2", "prompt": "Hi", "max_tokens": 3})
        probe.publish(T.request, {"id": "q3", "prompt": "Hi", "max_tokens": 3})
        busy = probe.replies("q3")
        assert busy == [proto.error_payload("q3", proto.BUSY, busy[0]["error"]["message"])]
        gated.gate.set()
        for rid in ("q1", "q2"):
            check_stream(probe.replies(rid), rid)


def test_a_redelivered_request_is_answered_once_but_another_device_may_reuse_its_id(broker, probe, model):
    gated = Gated(model)
    with running_service(gated, connection(broker.url)):
        for _ in range(2):  # the second arrives while the first is running: nothing more is sent
            probe.publish(T.request, {"id": "dup", "prompt": "Hi", "max_tokens": 3})
        assert gated.started.wait(5)
        time.sleep(0.2)
        gated.gate.set()
        check_stream(probe.replies("dup"), "dup")
        probe.publish(T.request, {"id": "dup", "prompt": "Hi", "max_tokens": 3, "reply_to": "other/device"})
        msg = probe.wait(lambda m: is_reply(payload(m), "dup") and payload(m).get("done") is True)
        assert msg.topic == "other/device"
        later = [payload(m) for m in probe.drain(0.5)]
    assert not [d for d in later if is_reply(d, "dup")]


def test_cancel_running_and_queued(broker, probe, model, caplog):
    caplog.set_level(logging.INFO, logger="edgellm.service")
    gated = Gated(model)
    with running_service(gated, connection(broker.url)):
        probe.publish(T.request, {"id": "c1", "prompt": "Hi", "max_tokens": 50, "cancel_key": "key-of-c1"})
        assert gated.started.wait(5)
        probe.publish(T.request, {"id": "c2", "prompt": "Hi", "max_tokens": 50, "cancel_key": "key-of-c2"})
        probe.publish(T.cancel, {"id": "c1", "cancel_key": "key-of-c1"})
        probe.publish(T.cancel, {"id": "c2", "cancel_key": "key-of-c2"})
        probe.publish(T.cancel, b"not json")  # refused on the errors topic, not fatal
        assert payload(probe.wait(lambda m: m.topic == T.errors))["error"]["code"] == proto.BAD_REQUEST
        assert _wait(lambda: sum("cancelling request" in r.getMessage() for r in caplog.records) == 2)
        gated.gate.set()
        assert check_stream(probe.replies("c1"), "c1")["finish_reason"] == "cancelled"
        assert probe.replies("c2")[0]["error"]["code"] == proto.CANCELLED


def test_broker_restart_mid_generation_still_delivers_the_final_reply(broker, model):
    # The device keeps a persistent session too, so replies sent while it reconnects wait for it.
    device = Probe(connection(broker.url), "device-1", persistent=True, topics=(T.response("#"),))
    gated = Gated(model)
    try:
        with running_service(gated, connection(broker.url)) as service:
            device.publish(T.request, {"id": "m1", "prompt": "Hello", "max_tokens": 12})
            assert gated.started.wait(5)
            broker.stop()
            assert _wait(lambda: not service.connected.is_set())
            gated.gate.set()  # generate while there is no broker
            time.sleep(0.3)
            broker.start()
            final = check_stream(device.replies("m1", timeout=20), "m1")
            # The broker hands the unacknowledged request again (DUP): acknowledged, not answered twice.
            again = [payload(m) for m in device.drain(0.5) if is_reply(payload(m), "m1")]
    finally:
        device.close()
    assert again == [] and "restart" not in final


def test_requests_sent_while_the_service_is_down_are_answered_when_it_is_back(broker, probe, model):
    with running_service(model, connection(broker.url), client_id="svc-a"):
        pass  # the first connection creates the persistent session and its subscription
    assert probe.wait(lambda m: m.topic == T.status and payload(m) == {"state": "offline"})  # a clean stop
    probe.publish(T.request, {"id": "late", "prompt": "Hi", "max_tokens": 3})
    with running_service(model, connection(broker.url), client_id="svc-a"):
        check_stream(probe.replies("late"), "late")


def test_status_is_retained_and_turns_offline_when_the_process_is_killed(broker, tiny_bundle):
    status_topic = "edgellm/killme/status"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm.cli", "serve", str(tiny_bundle), "--broker", broker.url,
         "--device-id", "killme"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        online = check_status_lifecycle(lambda: connection(broker.url), status_topic, proc)
    finally:
        proc.stderr.close()
    assert schema_errors(online, load_schema("status")) == []
    assert online["device"] == "killme" and online["capabilities"]["mqtt_version"] == "5"


def test_username_password_and_a_clear_refusal(tmp_path, model, tiny_bundle, caplog):
    passwd = make_password_file(tmp_path, "edge", "s3cret")
    mosq = start_broker(tmp_path / "broker", (f"password_file {passwd}", "allow_anonymous false"))
    try:
        good = connection(mosq.url, username="edge", password="s3cret")
        with running_service(model, good):
            reply = list(ask(good, T, {"id": "pw", "prompt": "Hi", "max_tokens": 3}, timeout=10))
            assert reply[-1]["done"] is True
        (tmp_path / "wrong").write_text("guess\n")
        from edgellm.cli.main import main

        with caplog.at_level(logging.ERROR, logger="edgellm.service"):
            rc = main(["serve", str(tiny_bundle), "--broker", mosq.url, "--device-id", "dev1",
                       "--username", "edge", "--password-file", str(tmp_path / "wrong")])
        assert rc == 1
        refused = [r.getMessage() for r in caplog.records if "refused the connection" in r.getMessage()]
        assert refused and ("bad user name or password" in refused[0] or "not authorized" in refused[0])
    finally:
        mosq.close()


def test_tls(tmp_path, model):
    if not _has("openssl"):
        pytest.skip("openssl is not installed")
    files = make_tls_files(tmp_path)
    mosq = start_broker(tmp_path / "broker", (f"cafile {files['ca']}", f"certfile {files['cert']}",
                                               f"keyfile {files['key']}"))
    try:
        conn = connection(mosq.url.replace("mqtt://", "mqtts://"), tls_ca=str(files["ca"]))
        with running_service(model, conn):
            replies = list(ask(conn, T, {"id": "tls", "prompt": "Hi", "max_tokens": 3}, timeout=10))
        check_stream(replies, "tls")
    finally:
        mosq.close()


def test_shared_group_answers_each_request_exactly_once(broker, probe, tiny_bundle):
    import edgellm

    models = [Counting(edgellm.load(tiny_bundle)) for _ in range(2)]
    # Room for all 20 in each member's queue: a slow machine must not turn this into a test of `busy`.
    room = dict(queue_size=20, per_client=20)
    with running_service(models[0], connection(broker.url), shared_group="g", client_id="m0", **room), \
            running_service(models[1], connection(broker.url), shared_group="g", client_id="m1", **room):
        ids = [f"s{i}" for i in range(20)]
        for rid in ids:
            probe.publish(T.request, {"id": rid, "prompt": "Hi", "max_tokens": 2, "stream": False})
        finals = [payload(probe.wait(lambda m: payload(m).get("done") is True)) for _ in ids]
        extra = [payload(m) for m in probe.drain(0.5)]
    assert sorted(f["id"] for f in finals) == sorted(ids)
    assert not [d for d in extra if d.get("done")]
    assert all(m.calls > 0 for m in models) and sum(m.calls for m in models) == 20


def test_ask_command_prints_the_streamed_answer(broker, model, capsys):
    from edgellm.cli.main import main

    with running_service(model, connection(broker.url)):
        rc = main(["ask", "--broker", broker.url, "--device-id", "dev1", "-n", "6", "--raw", "Hello there"])
    assert rc == 0
    assert capsys.readouterr().out == model.generate("Hello there", max_new_tokens=6).text + "\n"


def test_ask_command_fails_with_one_line_when_nobody_answers(broker, capsys):
    from edgellm.cli.main import main

    rc = main(["ask", "--broker", broker.url, "--device-id", "nobody", "--timeout", "0.5", "Hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and "no reply within 0.5s" in err


def test_serve_config_file_fills_unset_options(tmp_path):
    from edgellm.cli.main import build_parser
    from edgellm.cli.commands import _apply_config

    config = tmp_path / "edgellm.toml"
    config.write_text('[serve]\nbroker = "mqtt://b:1883"\ndevice-id = "kitchen"\nqueue-size = 2\nmqtt-version = 5\n')
    args = build_parser().parse_args(["serve", "bundle", "--config", str(config), "--device-id", "cli"])
    _apply_config(args)
    assert (args.broker, args.device_id, args.queue_size, args.mqtt_version) == ("mqtt://b:1883", "cli", 2, "5")
    config.write_text('[serve]\nqueue_size = "two"\n')
    with pytest.raises(ValueError, match="queue_size must be an integer"):
        _apply_config(build_parser().parse_args(["serve", "bundle", "--config", str(config)]))
    config.write_text('[serve]\nbrokr = "x"\n')
    with pytest.raises(ValueError, match="unknown key serve.brokr"):
        _apply_config(build_parser().parse_args(["serve", "bundle", "--config", str(config)]))


def test_embedded_broker_starts_and_stops_and_says_how_to_install_when_missing(monkeypatch):
    with Mosquitto() as mosq:
        p = Probe(connection(mosq.url))
        p.close()
        process = mosq.process
    assert process.poll() is not None
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr("edgellm.service.broker._SEARCH", ())
    with pytest.raises(BrokerError, match="install mosquitto"):
        Mosquitto()


class Counting(Hooked):
    """A real model that counts its generations, to see which shared-group member ran them."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.calls = 0

    def added(self, params, tenant: str) -> None:
        self.calls += 1


def _wait(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _has(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None or os.path.exists(f"/usr/bin/{tool}")


def test_the_docs_ten_lines_of_python_print_the_answer_every_run(broker, model):
    """docs/mqtt.md's paho snippet, run as written but for the broker's address, twice: with a fixed
    id the second run got the stored final reply and printed no answer."""
    docs = (ROOT / "docs" / "mqtt.md").read_text()
    snippet = docs.split("## Ten lines of Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace('c.connect("broker.local", 1883)', f'c.connect("127.0.0.1", {broker.port})')
    assert str(broker.port) in snippet
    expected = model.generate("Hello", max_new_tokens=30)
    with running_service(model, connection(broker.url), device_id="kitchen"):
        for _ in range(2):
            run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=30)
            assert run.returncode == 0, run.stderr
            assert run.stdout == f"{expected.text}\n {expected.finish_reason}\n", run.stdout

"""Issue 19 item 9: a request the service accepted is not lost when the process dies.

A QoS 1 request is acknowledged to the broker only once the reply that ends it is out, so the
persistent session hands it again to the restarted service, which answers it from the start
(its first reply flagged `restart`). Every other way a request ends must acknowledge it too, or
the broker would hand it again at every start and its unacknowledged requests would fill the
window it may send (Receive Maximum) and stall the service.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgellm.service import protocol as proto
from edgellm.service.broker import find_mosquitto
from mqtt_helpers import (Gated, Probe, connection, held_for, is_reply, load_schema, payload, running_service,
                          schema_errors)

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)"),
    pytest.mark.timeout(120),
]
T = proto.Topics("edgellm", "dev1")
ROOT = Path(__file__).parent.parent
INBOX = "device/9/in"


@pytest.fixture(scope="module")
def slow_bundle(tiny_bundle_factory) -> Path:
    """Wide enough that 400 tokens take about a second here: the kill lands mid-stream."""
    return tiny_bundle_factory("llama", max_position_embeddings=2048, hidden_size=256, num_layers=4,
                               intermediate_size=512)


def serve(bundle: Path, broker, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgellm.cli", "serve", str(bundle), "--broker", broker.url, "--device-id", T.device,
         "--client-id", "svc-crash"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))


def until_online(device: Probe) -> None:
    device.wait(lambda m: m.topic == T.status and payload(m).get("state") == "online" and not m.retain, timeout=60)


def test_a_request_cut_off_by_kill_9_is_answered_once_by_the_restarted_service(broker, slow_bundle, tmp_path):
    device = Probe(connection(broker.url), "device-9", topics=(INBOX, T.status))
    first = serve(slow_bundle, broker, tmp_path / "serve-1.log")
    second = None
    try:
        until_online(device)
        # Greedy, and the end-of-text token (id 2) barred: a long answer, the same at every try.
        request = {"id": "crash-1", "prompt": "Tell me a story", "max_tokens": 400, "temperature": 0,
                   "logit_bias": {"2": -100}}
        device.publish(T.request, request, response_topic=INBOX, correlation=b"corr-9")
        device.wait(lambda m: m.topic == INBOX and payload(m).get("seq") == 2, timeout=30)
        first.kill()  # SIGKILL: no offline status, no goodbye, nothing flushed
        first.wait(10)
        before = [payload(m) for m in device.drain(0.3) if m.topic == INBOX]
        assert not [r for r in before if r.get("done") or r.get("status")], "answered before the kill: too fast"

        second = serve(slow_bundle, broker, tmp_path / "serve-2.log")
        replies = []
        while not replies or not (replies[-1].get("done") or replies[-1].get("status")):
            msg = device.wait(lambda m: m.topic == INBOX, timeout=60)
            assert msg.properties.CorrelationData == b"corr-9"
            replies.append(payload(msg))
        later = [payload(m) for m in device.drain(0.3) if m.topic == INBOX]
        second.terminate()  # a clean stop: what it acknowledged has reached the broker before it says offline
        assert second.wait(30) == 0
        held = held_for(connection(broker.url), "svc-crash")
    finally:
        device.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    *chunks, final = replies
    assert final["done"] is True and final["finish_reason"] == "length", final
    assert chunks[0]["restart"] is True and [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert all("restart" not in r for r in chunks[1:] + [final])
    assert "".join(c["delta"] for c in chunks) == final["text"]
    for reply in chunks:
        assert schema_errors(reply, load_schema("chunk")) == []
    assert schema_errors(final, load_schema("final")) == []
    assert later == []  # exactly one final answer
    assert held == []  # and the broker no longer holds the request for the service


def test_every_way_a_request_ends_acknowledges_it(broker, probe, model):
    """Answered, refused as busy, a retry while queued or answered, cancelled, malformed, too large
    (read whole or cut by the bounded reader), retained, a bad cancel, a grammar that does not
    compile: a service started again with the same client id is handed none of them."""
    gated = Gated(model)
    big = json.dumps({"id": "big", "prompt": "x" * 100_000}).encode()  # over packet_limit(1000): cut on reading
    with running_service(gated, connection(broker.url), client_id="svc-acks", queue_size=1, max_payload=1000):
        probe.publish(T.request, {"id": "run", "prompt": "Hi", "max_tokens": 3})
        assert gated.started.wait(5)
        probe.publish(T.request, {"id": "wait", "prompt": "Hi", "max_tokens": 3, "cancel_key": "key-of-wait"})
        probe.publish(T.request, {"id": "full", "prompt": "Hi", "max_tokens": 3})
        probe.publish(T.request, {"id": "wait", "prompt": "Hi", "max_tokens": 3, "cancel_key": "key-of-wait"})
        probe.publish(T.cancel, {"id": "wait", "cancel_key": "key-of-wait"})
        probe.publish(T.cancel, {"id": "run", "cancel_key": "a-guessed-key"})
        probe.publish(T.cancel, b"not json")
        probe.publish(T.request, b"not json either")
        probe.publish(T.request, json.dumps({"id": "mid", "prompt": "x" * 3000}).encode())
        probe.publish(T.request, big)
        probe.publish(T.request, {"id": "kept", "prompt": "Hi", "max_tokens": 3}, retain=True)
        errors = {rid: probe.replies(rid)[-1]["error"]["code"] for rid in ("full", "mid", "big", "kept")}
        gated.gate.set()
        assert probe.replies("run")[-1]["done"] is True
        assert probe.replies("wait")[-1]["error"]["code"] == proto.CANCELLED
        probe.publish(T.request, {"id": "run", "prompt": "Hi", "max_tokens": 3})  # answered: its final again
        assert probe.replies("run")[-1]["done"] is True
        probe.publish(T.request, {"id": "rx", "prompt": "Hi", "grammar": {"type": "regex", "value": "("}})
        assert probe.replies("rx")[-1]["status"] == "error"  # a grammar that does not compile
        time.sleep(0.3)
    assert errors == {"full": proto.BUSY, "mid": proto.TOO_LARGE, "big": proto.TOO_LARGE, "kept": proto.BAD_REQUEST}
    assert [m.topic for m in held_for(connection(broker.url), "svc-acks")] == []


def test_requests_held_unacknowledged_leave_room_for_refusals_and_cancels(broker, probe, model):
    """The broker hands at most its window of unacknowledged messages (mosquitto: 20 unless the
    client's Receive Maximum says otherwise): with a queue of 24 held, the 26th request must still
    arrive to be answered busy, and a cancel of a queued one must still get through."""
    gated = Gated(model)
    room = dict(queue_size=24, per_client=24)
    with running_service(gated, connection(broker.url), **room):
        def ask(rid: str) -> None:
            probe.publish(T.request, {"id": rid, "prompt": "Hi", "max_tokens": 2, "stream": False,
                                      "cancel_key": f"key-of-{rid}"})

        ask("r0")
        assert gated.started.wait(5)
        for i in range(1, 26):
            ask(f"r{i}")
        busy = probe.replies("r25")[-1]
        probe.publish(T.cancel, {"id": "r24", "cancel_key": "key-of-r24"})
        time.sleep(0.3)
        gated.gate.set()
        ends = {rid: probe.replies(rid, timeout=30)[-1] for rid in (f"r{i}" for i in range(25))}
    assert busy["error"]["code"] == proto.BUSY
    assert ends.pop("r24")["error"]["code"] == proto.CANCELLED
    assert all(end.get("done") for end in ends.values())

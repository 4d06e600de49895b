"""Issue 9's defects of the MQTT service, each replayed on a real mosquitto: every request
answered on its own topic, memory bounded before parsing, devices unable to steer each other."""
from __future__ import annotations

import json
import subprocess
import threading
import time

import psutil
import pytest

from edgellm.service import protocol as proto
from edgellm.service.broker import find_mosquitto
from mqtt_helpers import Gated, Probe, connection, is_reply, payload, running_service

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)"),
    pytest.mark.timeout(120),
]
T = proto.Topics("edgellm", "dev1")


class PeakRss:
    """The largest resident size of this process over the `with` block, sampled every 5 ms."""

    def __enter__(self) -> "PeakRss":
        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def mosquitto_pub(broker, path, *, v5: bool, properties: tuple[str, ...] = ()) -> None:
    """Publish a file from another process, so the test process holds none of the message;
    `properties` are MQTT 5 PUBLISH properties as mosquitto_pub's `-D publish NAME VALUE` pairs."""
    version = ("-V", "mqttv5") if v5 else ("-V", "mqttv311")
    options = [arg for pair in zip(properties[::2], properties[1::2]) for arg in ("-D", "publish", *pair)]
    subprocess.run(["mosquitto_pub", "-p", str(broker.port), *version, "-q", "1", "-t", T.request, *options,
                    "-f", str(path)], check=True, timeout=60)


def big_request(path, rid: str, size: int) -> int:
    """Write a request whose prompt is `size` bytes to `path`, in pieces; returns its length."""
    with open(path, "wb") as f:
        f.write(json.dumps({"id": rid, "prompt": ""})[:-2].encode())
        for _ in range(size >> 20):
            f.write(b"x" * (1 << 20))
        f.write(b"x" * (size & ((1 << 20) - 1)) + b'"}')
        return f.tell()


@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_an_oversized_message_is_refused_without_being_held_in_memory(broker, model, tmp_path, version):
    v5 = version == "5"
    # Not on '#': a probe in this process must not receive the big request itself.
    probe = Probe(connection(broker.url), topics=(T.response("#"),))
    with running_service(model, connection(broker.url, mqtt_version=version), max_payload=8000):
        # Over the limit but under the packet limit: read, refused with its id.
        big_request(tmp_path / "mid", "mid-1", 20_000)
        mosquitto_pub(broker, tmp_path / "mid", v5=v5)
        data = payload(probe.wait(lambda m: is_reply(payload(m), "mid-1")))
        assert data["error"]["code"] == proto.TOO_LARGE and "limit is 8000" in data["error"]["message"]
        size = big_request(tmp_path / "huge", "huge-1", 96 << 20)
        with PeakRss() as rss:
            mosquitto_pub(broker, tmp_path / "huge", v5=v5)
            # read into a capped buffer and answered, on MQTT 5 too: no Maximum Packet Size lets the broker drop it
            data = payload(probe.wait(lambda m: is_reply(payload(m), "huge-1"), timeout=60))
            assert data["error"]["code"] == proto.TOO_LARGE
            assert data["error"]["message"] == f"payload is {size} bytes, limit is 8000"
            probe.publish(T.request, {"id": "after", "prompt": "Hi", "max_tokens": 3})
            replies = probe.replies("after", timeout=60)
        assert replies[-1]["done"] is True
        assert rss.growth_mb <= 64, f"peak RSS grew {rss.growth_mb:.0f} MB for a 96 MB message"
    probe.close()


def test_a_2mb_mqtt5_request_is_answered_too_large_on_its_response_topic(broker, model, tmp_path):
    """Issue 19 item 8: above the Maximum Packet Size the service used to advertise (4 x max
    payload + 64 KiB), mosquitto dropped the request and the device never heard back."""
    probe = Probe(connection(broker.url), topics=("device/7/in",))
    size = big_request(tmp_path / "big", "two-mb", 2 << 20)
    with running_service(model, connection(broker.url)):  # the default --max-payload, 64 KiB
        with PeakRss() as rss:
            mosquitto_pub(broker, tmp_path / "big", v5=True,
                          properties=("response-topic", "device/7/in", "correlation-data", "req-7"))
            msg = probe.wait(lambda m: is_reply(payload(m), "two-mb"), timeout=30)
        probe.publish(T.request, {"id": "next", "prompt": "Hi", "max_tokens": 3}, response_topic="device/7/in")
        assert probe.replies("next")[-1]["done"] is True
    probe.close()
    assert payload(msg)["error"] == {"code": proto.TOO_LARGE,
                                     "message": f"payload is {size} bytes, limit is {proto.DEFAULT_MAX_PAYLOAD}"}
    assert msg.properties.CorrelationData == b"req-7"
    assert rss.growth_mb <= 16, f"peak RSS grew {rss.growth_mb:.1f} MB for a 2 MB request"


def test_a_lone_surrogate_in_reply_to_or_prompt_is_a_bad_request(broker, probe, model):
    with running_service(model, connection(broker.url)):
        probe.publish(T.request, b'{"id": "s1", "prompt": "hi", "reply_to": "a\\ud800"}')
        probe.publish(T.request, b'{"id": "s2", "prompt": "hi \\udfff"}')
        for rid in ("s1", "s2"):
            msg = probe.wait(lambda m: is_reply(payload(m), rid))
            assert msg.topic == T.response(rid)
            assert payload(msg)["error"]["code"] == proto.BAD_REQUEST


def test_the_same_request_again_gets_its_stored_answer(broker, probe, model):
    with running_service(model, connection(broker.url)):
        probe.publish(T.request, {"id": "dup1", "prompt": "hi", "max_tokens": 3})
        first = probe.replies("dup1")[-1]
        probe.publish(T.request, {"id": "dup1", "prompt": "hi", "max_tokens": 3})
        again = probe.replies("dup1")
    assert again == [first] and first["done"] is True


@pytest.mark.parametrize("version, after_restart", [("5", [proto.BAD_REQUEST]), ("3.1.1", [None])])
def test_a_retained_request_is_deleted_at_the_next_start(broker, probe, model, version, after_restart):
    request = {"id": "ret1", "prompt": "hi", "max_tokens": 3}
    with running_service(model, connection(broker.url, mqtt_version="3.1.1"), client_id="svc-r"):
        probe.publish(T.request, request, retain=True)
        assert probe.replies("ret1")[-1]["done"] is True  # live: the retain flag is not forwarded on 3.1.1
    for _ in range(2):  # only the first start sees the retained copy: it deletes it
        with running_service(model, connection(broker.url, mqtt_version=version), client_id="svc-r"):
            time.sleep(0.5)
    answers = [payload(m) for m in probe.drain(0.5) if is_reply(payload(m), "ret1") and payload(m).get("done")
               or payload(m).get("status") == "error"]
    assert [a.get("error", {}).get("code") for a in answers] == after_restart
    late = Probe(connection(broker.url), "late", topics=(T.request,))
    assert late.drain(0.5) == []  # nothing retained any more
    late.close()


def test_a_live_retained_request_is_refused_on_mqtt5(broker, probe, model):
    with running_service(model, connection(broker.url)):
        probe.publish(T.request, {"id": "ret2", "prompt": "hi", "max_tokens": 3}, retain=True)
        data = payload(probe.wait(lambda m: is_reply(payload(m), "ret2")))
    assert data["error"]["code"] == proto.BAD_REQUEST and "retain" in data["error"]["message"]


def test_cancel_needs_the_requests_key(broker, probe, model):
    gated = Gated(model)
    with running_service(gated, connection(broker.url)):
        probe.publish(T.request, {"id": "k1", "prompt": "Hi", "max_tokens": 20, "cancel_key": "device-secret"})
        assert gated.started.wait(5)
        probe.publish(T.cancel, {"id": "k1", "cancel_key": "a-guessed-key"}, response_topic="attacker/inbox")
        refused = probe.wait(lambda m: m.topic == "attacker/inbox")
        probe.publish(T.cancel, {"id": "k1"})  # only the id: an error on the errors topic, with no id
        no_key = probe.wait(lambda m: m.topic == T.errors)
        gated.gate.set()
        final = probe.replies("k1")[-1]
    assert payload(refused)["error"]["code"] == proto.FORBIDDEN and payload(refused)["id"] is None
    assert payload(no_key)["id"] is None
    assert final["finish_reason"] != "cancelled"  # neither stopped the request


@pytest.mark.parametrize("reply_to", ["edgellm/other/request", "edgellm/other/status", "edgellm/dev1/cancel",
                                      "edgellm/dev1/errors"])
def test_replies_cannot_be_aimed_at_control_topics(broker, probe, model, reply_to):
    with running_service(model, connection(broker.url)):
        probe.publish(T.request, {"id": "aim", "prompt": "Hi", "max_tokens": 2, "reply_to": reply_to})
        msg = probe.wait(lambda m: is_reply(payload(m), "aim"))
        others = [m.topic for m in probe.drain(0.3) if m.topic == reply_to]
    assert msg.topic == T.response("aim") and payload(msg)["error"]["code"] == proto.BAD_REQUEST
    assert others == []


@pytest.mark.parametrize("topic", ["$SYS/broker/x", "edgellm/other/request"])
def test_a_bad_response_topic_is_refused_not_replaced(broker, probe, model, topic):
    with running_service(model, connection(broker.url)):
        probe.publish(T.request, {"id": "rt", "prompt": "Hi", "max_tokens": 2}, response_topic=topic)
        msg = probe.wait(lambda m: is_reply(payload(m), "rt"))
    assert msg.topic == T.response("rt") and payload(msg)["error"]["code"] == proto.BAD_REQUEST


def test_large_correlation_data_is_refused(broker, probe, model):
    with running_service(model, connection(broker.url)):
        probe.publish(T.request, {"id": "cd", "prompt": "Hi", "max_tokens": 2}, response_topic="me/in",
                      correlation=b"c" * 60_000)
        msg = probe.wait(lambda m: is_reply(payload(m), "cd"))
    assert payload(msg)["error"]["code"] == proto.BAD_REQUEST and "Correlation Data" in payload(msg)["error"]["message"]
    assert msg.properties is None or getattr(msg.properties, "CorrelationData", None) is None


def test_a_request_over_the_token_ceiling_is_refused(broker, probe, model):
    with running_service(model, connection(broker.url), max_tokens=16):
        probe.publish(T.request, {"id": "big", "prompt": "Hi", "max_tokens": 1 << 20})
        probe.publish(T.request, {"id": "dflt", "prompt": "Hi"})  # the bundle's default budget, capped
        refused = probe.replies("big")[-1]
        final = probe.replies("dflt", timeout=30)[-1]
    assert refused["error"]["code"] == proto.BAD_REQUEST and "at most 16" in refused["error"]["message"]
    assert final["usage"]["completion_tokens"] <= 16


def test_a_flooding_device_does_not_starve_another(broker, probe, model):
    gated = Gated(model)
    with running_service(gated, connection(broker.url), queue_size=6):
        probe.publish(T.request, {"id": "f0", "prompt": "Hi", "max_tokens": 2, "reply_to": "flood/in"})
        assert gated.started.wait(5)
        for i in range(1, 6):
            probe.publish(T.request, {"id": f"f{i}", "prompt": "Hi", "max_tokens": 2, "reply_to": "flood/in"})
        probe.publish(T.request, {"id": "calm", "prompt": "Hi", "max_tokens": 2, "reply_to": "calm/in"})
        busy = [payload(m)["id"] for m in probe.drain(1.0)
                if m.topic == "flood/in" and payload(m).get("error", {}).get("code") == proto.BUSY]
        gated.gate.set()
        finals = []
        while len(finals) < 5:
            data = payload(probe.wait(lambda m: m.topic in ("flood/in", "calm/in") and payload(m).get("done")))
            finals.append(data["id"])
    assert busy == ["f4", "f5"]  # three waiting is the flooding topic's share of six
    assert finals.index("calm") <= 2  # served right after the flood's running and next request


def test_a_prompt_too_long_for_the_context_is_refused_before_the_queue(broker, probe, model):
    """Text of more bytes than the context times the longest token's cannot fit: the MQTT front
    refuses it on the network thread (Engine.cannot_fit, as the HTTP front does), so it never
    takes a queue place and the worker never renders or tokenizes it."""
    gated = Gated(model)
    size = model.max_context * model.tokenizer.bytes_per_token + 1
    with running_service(gated, connection(broker.url), max_payload=size + 4096):
        probe.publish(T.request, {"id": "huge", "prompt": "x" * size})
        refused = probe.replies("huge")[-1]
    assert refused["error"]["code"] == proto.BAD_REQUEST and "context is" in refused["error"]["message"]
    assert not gated.started.is_set(), "the prompt reached the model"

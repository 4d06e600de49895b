"""Home Assistant MQTT discovery against a real mosquitto: the payloads a subscriber reads are
checked against the keys Home Assistant documents (device-based discovery, the sensor and
event platforms), and their templates are rendered on the state topics' real payloads, as
Home Assistant would render them (Jinja)."""
from __future__ import annotations

import json
import time

import jinja2
import pytest

from edgellm.integrations import ha_discovery
from edgellm.integrations.ha_discovery import HaDiscovery
from edgellm.service import protocol as proto
from mqtt_helpers import Probe, connection, payload, running_service

# https://www.home-assistant.io/integrations/mqtt/ (device discovery payload) and the sensor/event
# platform pages: the keys each may carry, and those it must.
DEVICE_PAYLOAD = {"dev", "o", "cmps", "state_topic", "command_topic", "encoding", "qos", "availability",
                  "availability_topic", "availability_mode"}
DEVICE = {"identifiers", "connections", "configuration_url", "hw_version", "manufacturer", "model", "model_id",
          "name", "serial_number", "suggested_area", "sw_version", "via_device"}
ORIGIN = {"name", "sw_version", "support_url"}
COMMON = {"p", "availability", "availability_mode", "availability_template", "availability_topic", "device_class",
          "enabled_by_default", "encoding", "entity_category", "entity_picture", "icon", "json_attributes_template",
          "json_attributes_topic", "name", "object_id", "default_entity_id", "payload_available",
          "payload_not_available", "qos", "state_topic", "unique_id", "value_template"}
PLATFORMS = {
    "sensor": (COMMON | {"expire_after", "force_update", "last_reset_value_template", "options", "state_class",
                         "suggested_display_precision", "unit_of_measurement"}, {"state_topic", "unique_id"}),
    "event": (COMMON | {"event_types"}, {"state_topic", "event_types", "unique_id"}),
}
AVAILABILITY = {"topic", "payload_available", "payload_not_available", "value_template"}


def check_documented(config: dict) -> None:
    assert set(config) <= DEVICE_PAYLOAD, set(config) - DEVICE_PAYLOAD
    assert config["dev"]["identifiers"] and set(config["dev"]) <= DEVICE
    assert config["o"]["name"] and set(config["o"]) <= ORIGIN  # origin is required for device discovery
    assert config["cmps"]
    for cid, cmp in config["cmps"].items():
        allowed, required = PLATFORMS[cmp["p"]]
        assert set(cmp) <= allowed, (cid, set(cmp) - allowed)
        assert required <= set(cmp), (cid, required - set(cmp))
        for item in cmp.get("availability", []):
            assert set(item) <= AVAILABILITY and "topic" in item


def render(template: str, data: dict) -> str:
    return jinja2.Environment().from_string(template).render(value_json=data).strip()


def latest(probe: Probe, topic: str, timeout: float = 10.0) -> dict:
    return payload(probe.wait(lambda m: m.topic == topic, timeout))


def retained(broker, *topics: str) -> list:
    """What a Home Assistant starting now reads on `topics`: their retained messages."""
    fresh = Probe(connection(broker.url), "reader")
    seen: dict = {}
    try:
        while set(seen) != set(topics):
            msg = fresh.wait(lambda m: m.topic in topics)
            assert msg.retain, msg.topic
            seen[msg.topic] = msg
    finally:
        fresh.close()
    return [seen[t] for t in topics]


@pytest.fixture
def service(model, broker):
    with running_service(model, connection(broker.url), device_id="dev1") as svc:
        yield svc


def start_discovery(service, broker, **kw) -> HaDiscovery:
    discovery = HaDiscovery(connection(broker.url), service.topics, service.engine, "tiny-model",
                            status_topic=service.status_topic, **kw).start()
    assert discovery.connected.wait(10)
    return discovery


def test_the_service_device_follows_the_documented_keys_and_its_templates_read_its_state(service, broker, probe):
    discovery = start_discovery(service, broker)
    try:
        probe.wait(lambda m: m.topic == "homeassistant/device/edgellm_dev1/config")
        msg, status_msg, metrics_msg = retained(broker, "homeassistant/device/edgellm_dev1/config",
                                                service.status_topic, discovery.metrics_topic)
        status, metrics = payload(status_msg), payload(metrics_msg)
        config = json.loads(msg.payload)
        check_documented(config)
        cmps = config["cmps"]
        assert {c["p"] for c in cmps.values()} == {"sensor"} and len(cmps) == 5
        state = {c["state_topic"] for c in cmps.values()}
        assert state == {service.status_topic, discovery.metrics_topic}
        values = {cid.rsplit("_", 1)[-1] if not cid.endswith("per_s") else "tokens_per_s":
                  render(c["value_template"], status if c["state_topic"] == service.status_topic else metrics)
                  for cid, c in cmps.items()}
        assert values == {"status": "online", "model": service.model.manifest.name, "queue": "0", "active": "0",
                          "tokens_per_s": "0.0"}
        for cid, cmp in cmps.items():
            for item in cmp.get("availability", []):
                assert item["topic"] == service.status_topic and render(item["value_template"], status) == "online"

        probe.publish(service.topics.request, {"id": "r1", "prompt": "hello", "max_tokens": 8, "temperature": 0})
        probe.wait(lambda m: payload(m).get("id") == "r1" and payload(m).get("done"), 60)
        update = probe.wait(lambda m: m.topic == discovery.metrics_topic and payload(m).get("tokens_per_s"), 5)
        assert float(render("{{ value_json.tokens_per_s }}", payload(update))) > 0
    finally:
        discovery.stop()
    service.stop()
    offline = latest(probe, service.status_topic)
    assert render("{{ value_json.state }}", offline) == "offline"  # every entity with availability goes unavailable


def test_the_configs_are_sent_again_when_home_assistant_comes_online(service, broker, probe):
    discovery = start_discovery(service, broker)
    topic = "homeassistant/device/edgellm_dev1/config"
    try:
        first = probe.wait(lambda m: m.topic == topic)
        probe.publish("homeassistant/status", "offline")
        with pytest.raises(AssertionError):
            probe.wait(lambda m: m.topic == topic, 1.0)
        probe.publish("homeassistant/status", "online")
        again = probe.wait(lambda m: m.topic == topic, 5)
        assert again.payload == first.payload
    finally:
        discovery.stop()


def explanation(machine: str, summary: str, incomplete: bool = False) -> dict:
    """What the anomaly recipe publishes (recipes.anomaly.explanation)."""
    answer = None if incomplete else {"summary": summary, "likely_causes": ["bearing wear"], "severity": "high",
                                      "recommended_action": "inspect", "evidence": ["9.1 mm/s"]}
    return {"id": "ev-1", "machine": machine, "sensor": "vibration", "events": {"count": 1}, "finish_reason": "stop",
            "usage": {}, "incomplete": incomplete, "explanation": answer}


def test_each_explanation_fires_its_machines_event(service, broker, probe, monkeypatch):
    monkeypatch.setattr(ha_discovery, "MAX_MACHINES", 2)
    discovery = start_discovery(service, broker, explanations="factory/+/+/explanation")
    try:
        probe.wait(lambda m: m.topic == "homeassistant/device/edgellm_dev1/config")
        probe.publish("factory/press-3/vibration/explanation", explanation("press-3", "Vibration tripled."))
        config_msg = probe.wait(lambda m: m.topic == "homeassistant/device/edgellm_dev1_press-3/config")
        config = json.loads(config_msg.payload)
        check_documented(config)
        (event,) = config["cmps"].values()
        assert event["p"] == "event" and config["dev"]["via_device"] == "edgellm_dev1"
        fired = payload(probe.wait(lambda m: m.topic == event["state_topic"]))
        assert fired["event_type"] in event["event_types"] and fired["event_type"] == "explanation"
        assert fired["summary"] == "Vibration tripled." and fired["explanation"]["severity"] == "high"

        probe.publish("factory/press-3/vibration/explanation", explanation("press-3", "", incomplete=True))
        assert payload(probe.wait(lambda m: m.topic == event["state_topic"]))["event_type"] == "incomplete"

        # A hostile machine name becomes a safe object id; past the bound, no more devices.
        probe.publish("factory/x/vibration/explanation", explanation("a/#+b", "x"))
        probe.wait(lambda m: m.topic == "homeassistant/device/edgellm_dev1_a___b/config")
        probe.publish("factory/y/vibration/explanation", explanation("third", "x"))
        with pytest.raises(AssertionError):
            probe.wait(lambda m: "third" in m.topic, 1.0)
        assert len(discovery._machines) == 2
    finally:
        discovery.stop()

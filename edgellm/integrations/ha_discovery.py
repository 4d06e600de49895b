"""Home Assistant MQTT discovery: the service (and the anomaly recipe's machines) appear in
Home Assistant by themselves.

Device-based discovery (`<prefix>/device/<id>/config`, retained): one device per service with
its status, model, queue depth, active slots and last tok/s as sensors, available while the
service's own retained status says `online` (its Last Will says `offline`); with the anomaly
recipe, one device per machine with an `event` entity that fires with each explanation. The
configs are sent again whenever Home Assistant announces `online` on `<prefix>/status` (its
birth message), so a Home Assistant that lost its retained state finds everything again.

Nothing here removes an entity: a restart that has not yet seen a machine leaves that
machine's retained config alone (removing is the operator's empty retained config, see
docs/home-assistant.md).
"""
from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

import paho.mqtt.client as mqtt

from .. import __version__
from ..engine import Engine, Outcome
from ..service import protocol as proto
from ..service.connection import Connection, connect_async, connect_failure_reason, make_client

log = logging.getLogger("edgellm.integrations.ha")

DEFAULT_PREFIX = "homeassistant"
ORIGIN = {"name": "edgellm", "sw_version": __version__, "support_url": "https://github.com/edgellm/edgellm"}
MAX_MACHINES = 256  # event entities at most: machine names come from the network
METRICS_INTERVAL = 1.0  # seconds between metrics updates while they change
MAX_EXPLANATION_BYTES = 65536


def object_id(text: str) -> str:
    """`text` as a discovery object id: Home Assistant accepts only [a-zA-Z0-9_-] there."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:64] or "_"


class HaDiscovery:
    """Announces a service (and the recipe's machines) to Home Assistant; `start()`, then `stop()`.

    `explanations`: the recipe's output topic filter (its `{machine}` and `{sensor}` as `+`),
    or None without the recipe."""

    def __init__(self, conn: Connection, topics: proto.Topics, engine: Engine, model_name: str, *,
                 status_topic: str, prefix: str = DEFAULT_PREFIX, explanations: str | None = None,
                 client_id: str | None = None) -> None:
        if not proto.valid_topic(prefix) or prefix.endswith("/"):
            raise ValueError(f"--ha-discovery {prefix!r} must be a topic prefix without wildcards or a trailing '/'")
        self.conn = conn
        self.topics = topics
        self.engine = engine
        self.model_name = model_name
        self.prefix = prefix
        self.status_topic = status_topic
        self.explanations = explanations
        self.device_id = object_id(f"edgellm_{topics.device}")
        self.metrics_topic = f"{topics.base}/ha/metrics"
        self._machines: dict[str, str] = {}  # object id -> machine name, announced this run
        self._tokens_per_s = 0.0
        self._last_metrics: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.client = make_client(conn, client_id or f"edgellm-{topics.device}-ha", persistent=False,
                                  max_packet=proto.packet_limit(MAX_EXPLANATION_BYTES))
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = lambda *_: log.warning(
            "ha discovery: cannot connect to %s: %s", conn.broker, connect_failure_reason(self.client))
        self.client.on_disconnect = lambda *_: self.connected.clear()
        self.client.on_message = self._on_message
        self._ticker = threading.Thread(target=self._tick, name="edgellm-ha-metrics", daemon=True)

    def start(self) -> "HaDiscovery":
        self.engine.observers.append(self._finished)
        connect_async(self.client, self.conn, persistent=False)
        self.client.loop_start()
        self._ticker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._finished in self.engine.observers:
            self.engine.observers.remove(self._finished)
        self._ticker.join(2)
        self.client.disconnect()
        self.client.loop_stop()

    # -- what Home Assistant is told -------------------------------------------

    def service_config(self) -> dict[str, Any]:
        """The service's device discovery payload."""
        status = {"state_topic": self.status_topic}
        metrics = {"state_topic": self.metrics_topic}
        sensors = {
            "status": ("Status", status, "{{ value_json.state }}", {"icon": "mdi:robot"}),
            "model": ("Model", status, "{{ value_json.model }}", {"icon": "mdi:brain"}),
            "queue": ("Queue depth", metrics, "{{ value_json.queue }}",
                      {"state_class": "measurement", "unit_of_measurement": "requests"}),
            "active": ("Active slots", metrics, "{{ value_json.active }}",
                       {"state_class": "measurement", "unit_of_measurement": "slots"}),
            "tokens_per_s": ("Last tokens per second", metrics, "{{ value_json.tokens_per_s }}",
                             {"state_class": "measurement", "unit_of_measurement": "tok/s"}),
        }
        cmps = {
            f"{self.device_id}_{key}": {"p": "sensor", "name": name, "unique_id": f"{self.device_id}_{key}",
                                        **topic, "value_template": template, **extra}
            for key, (name, topic, template, extra) in sensors.items()
        }
        # The status sensor stays available to say "offline"; the others follow the service.
        for key, cmp in cmps.items():
            if not key.endswith("_status"):
                cmp["availability"] = [self._availability()]
        return {"dev": self._service_device(), "o": ORIGIN, "cmps": cmps, "qos": 1}

    def machine_config(self, machine: str) -> dict[str, Any]:
        """One machine's device: an `event` entity that fires with each explanation."""
        mid = self._machine_id(machine)
        return {
            "dev": {"identifiers": [mid], "name": machine, "manufacturer": "edgellm anomaly recipe",
                    "via_device": self.device_id},
            "o": ORIGIN,
            "cmps": {f"{mid}_explanation": {
                "p": "event", "name": "Anomaly explanation", "unique_id": f"{mid}_explanation",
                "state_topic": self.event_topic(machine), "event_types": ["explanation", "incomplete"],
                "availability": [self._availability()], "icon": "mdi:alert-decagram",
            }},
            "qos": 1,
        }

    def event_topic(self, machine: str) -> str:
        return f"{self.topics.base}/ha/anomaly/{self._machine_id(machine)}"

    def config_topic(self, oid: str) -> str:
        return f"{self.prefix}/device/{oid}/config"

    def metrics(self) -> dict[str, Any]:
        return {"queue": self.engine.waiting, "active": self.engine.active,
                "tokens_per_s": round(self._tokens_per_s, 2)}

    def _service_device(self) -> dict[str, Any]:
        return {"identifiers": [self.device_id], "name": f"edgellm {self.topics.device}", "manufacturer": "edgellm",
                "model": self.model_name, "sw_version": __version__}

    def _availability(self) -> dict[str, str]:
        return {"topic": self.status_topic, "value_template": "{{ value_json.state }}"}

    def _machine_id(self, machine: str) -> str:
        return object_id(f"{self.device_id}_{machine}")

    # -- paho callbacks (network thread) -------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("ha discovery: broker %s refused the connection: %s", self.conn.broker, reason)
            return
        client.subscribe([(f"{self.prefix}/status", 1), *([(self.explanations, 1)] if self.explanations else [])])
        self._announce()
        self.connected.set()
        log.info("ha discovery: announced device %s on %s", self.device_id, self.config_topic(self.device_id))

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == f"{self.prefix}/status":
                if msg.payload.strip() == b"online":  # Home Assistant (re)started: it may have lost our configs
                    log.info("ha discovery: Home Assistant is online; sending the discovery configs again")
                    self._announce()
            elif msg.payload and not msg.retain:
                self._on_explanation(msg.payload)
        except Exception:  # noqa: BLE001 - one bad message must never stop discovery
            log.exception("ha discovery: unexpected error handling a message on %s", msg.topic)

    def _on_explanation(self, payload: bytes) -> None:
        """Fire the machine's event with one of the recipe's explanations."""
        try:
            data = proto.decode_json(payload, MAX_EXPLANATION_BYTES)
        except Exception:  # noqa: BLE001 - the topic is public: anything may arrive on it
            return
        machine = data.get("machine") if isinstance(data, dict) else None
        if not isinstance(machine, str) or not machine:
            return
        mid = self._machine_id(machine)
        with self._lock:
            new = mid not in self._machines
            if new and len(self._machines) >= MAX_MACHINES:
                log.warning("ha discovery: %d machines announced already; %r gets no event entity", MAX_MACHINES,
                            machine)
                return
            self._machines[mid] = machine
        if new:
            self._publish(self.config_topic(mid), self.machine_config(machine), retain=True)
        answer = data.get("explanation")
        summary = answer.get("summary") if isinstance(answer, dict) else None
        self._publish(self.event_topic(machine), {
            **data, "event_type": "incomplete" if data.get("incomplete") else "explanation",
            "summary": summary if isinstance(summary, str) else "",
        })

    def _announce(self) -> None:
        with self._lock:
            machines = list(self._machines.values())
        self._publish(self.config_topic(self.device_id), self.service_config(), retain=True)
        for machine in machines:
            self._publish(self.config_topic(self._machine_id(machine)), self.machine_config(machine), retain=True)
        self._publish(self.metrics_topic, self.metrics(), retain=True)

    def _publish(self, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        self.client.publish(topic, json.dumps(payload, separators=(",", ":")), qos=1, retain=retain)

    # -- metrics -----------------------------------------------------------------------

    def _finished(self, outcome: Outcome) -> None:
        """Engine observer (worker thread): the last finished request's decode speed."""
        rate = getattr(getattr(outcome.last, "usage", None), "decode_tokens_per_s", None)
        if isinstance(rate, (int, float)) and rate > 0:
            self._tokens_per_s = float(rate)

    def _tick(self) -> None:
        """Publish the metrics when they change, at most once per METRICS_INTERVAL."""
        while not self._stop.wait(METRICS_INTERVAL):
            current = self.metrics()
            if current != self._last_metrics and self.connected.is_set():
                self._last_metrics = current
                self._publish(self.metrics_topic, current, retain=True)

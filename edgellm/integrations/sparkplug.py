"""Sparkplug B for the anomaly recipe: each explanation as String metrics of its machine's device.

A plant's SCADA host (Ignition and the like) reads `spBv1.0/{group}/NBIRTH|NDEATH|DBIRTH|DDATA/
{node}[/{device}]` with protobuf payloads. The node is this service: its NBIRTH names the metrics
it publishes (bdSeq, Node Control/Rebirth, the model) and its NDEATH is the MQTT Last Will, with the
same bdSeq, so a host knows which birth a death ends. bdSeq goes up by one per MQTT session and is
kept across restarts in a small state file. Each machine the recipe explains is a device: a DBIRTH
the first time, then a DDATA per explanation. A host's Rebirth command (NCMD) sends every birth
again. Payloads are encoded with pysparkplug (its Sparkplug B protobuf); the MQTT connection is
edgellm's own (paho 2).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from ..errors import RecipeError
from ..recipes.config import SparkplugConfig
from ..service import protocol as proto
from ..service.connection import Connection, connect_async, connect_failure_reason, make_client

try:
    import pysparkplug as spb
except ImportError:  # pragma: no cover - reported when the table asks for it
    spb = None

log = logging.getLogger("edgellm.integrations.sparkplug")

REBIRTH = "Node Control/Rebirth"
MAX_DEVICES = 256  # machine names come from the network
MAX_EXPLANATION_BYTES = 65536
# The String metrics of every machine's device, and where each comes from in an explanation.
DEVICE_METRICS = ("Explanation/Summary", "Explanation/Severity", "Explanation/Sensor", "Explanation/JSON")


def require() -> None:
    """RecipeError (one line) when the library is missing; checked before the model loads."""
    if spb is None:
        raise RecipeError("[sparkplug] needs pysparkplug: pip install --no-deps pysparkplug "
                          "(its metadata pins paho-mqtt < 2, which edgellm does not use; see docs/anomaly.md)")


def device_id(machine: str) -> str:
    """A machine name as a Sparkplug device id: no '/', '+' or '#'."""
    return re.sub(r"[/+#\s]", "_", machine)[:64] or "_"


class BdSeq:
    """The birth/death sequence number, 0..255, kept in `path` across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            value = int(path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            value = 0
        self.next_value = value % 256

    def take(self) -> int:
        """The bdSeq of a new session; the one after it is on disk before the session starts."""
        value, self.next_value = self.next_value, (self.next_value + 1) % 256
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(f"{self.next_value}\n", encoding="ascii")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("sparkplug: cannot keep bdSeq in %s (%s): a restart will reuse it", self.path, exc)
        return value


class SparkplugNode:
    """This service as a Sparkplug edge node; `start()`, then `stop()`. `explanations`: the
    recipe's output topic filter."""

    def __init__(self, conn: Connection, config: SparkplugConfig, node: str, explanations: str, model: str) -> None:
        require()
        self.conn = conn
        self.group = config.group
        self.node = config.node or node
        self.explanations = explanations
        self.model = model
        self.bd_seq = BdSeq(config.state_file)
        self._bd = 0
        self._seq = 0
        self._devices: dict[str, dict[str, str]] = {}  # device id -> its last metric values
        self._lock = threading.Lock()
        self._stopping = False
        self.born = threading.Event()  # NBIRTH sent and the explanations subscribed
        self.client = make_client(conn, f"edgellm-{self.node}-sparkplug", persistent=False,
                                  max_packet=proto.packet_limit(MAX_EXPLANATION_BYTES))
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = lambda *_: log.warning(
            "sparkplug: cannot connect to %s: %s", conn.broker, connect_failure_reason(self.client))
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda *_: self.born.set()
        self.client.on_message = self._on_message

    def topic(self, kind: str, device: str | None = None) -> str:
        return f"spBv1.0/{self.group}/{kind}/{self.node}" + (f"/{device}" if device else "")

    def start(self) -> "SparkplugNode":
        self._set_will()
        connect_async(self.client, self.conn, persistent=False)
        self.client.loop_start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """An orderly end says NDEATH itself (a Last Will goes out only when the connection is lost)."""
        self._stopping = True
        if self.born.is_set():
            info = self.client.publish(self.topic("NDEATH"), self._death(), qos=1)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("sparkplug: could not publish NDEATH before disconnecting")
        self.client.disconnect()
        self.client.loop_stop()

    # -- payloads ------------------------------------------------------------------------

    def _set_will(self) -> None:
        """Each MQTT session has its own bdSeq: its NDEATH (the Will) and its NBIRTH carry it."""
        self._bd = self.bd_seq.take()
        self.client.will_set(self.topic("NDEATH"), self._death(), qos=1, retain=False)

    def _death(self) -> bytes:
        return spb.NDeath(timestamp=spb.get_current_timestamp(), bd_seq_metric=self._bd_metric()).encode(
            include_dtypes=True)

    def _bd_metric(self) -> Any:
        return spb.Metric(timestamp=spb.get_current_timestamp(), name="bdSeq", datatype=spb.DataType.INT64,
                          value=self._bd)

    def _next_seq(self) -> int:
        seq, self._seq = self._seq, (self._seq + 1) % 256
        return seq

    def _births(self) -> list[tuple[str, bytes]]:
        """NBIRTH (seq 0) and every known device's DBIRTH, under the lock."""
        now = spb.get_current_timestamp()
        self._seq = 0
        node = (self._bd_metric(),
                spb.Metric(timestamp=now, name=REBIRTH, datatype=spb.DataType.BOOLEAN, value=False),
                spb.Metric(timestamp=now, name="Properties/Model", datatype=spb.DataType.STRING, value=self.model))
        out = [(self.topic("NBIRTH"), spb.NBirth(timestamp=now, seq=self._next_seq(), metrics=node))]
        for device, values in self._devices.items():
            out.append((self.topic("DBIRTH", device),
                        spb.DBirth(timestamp=now, seq=self._next_seq(), metrics=self._metrics(values, now))))
        return [(topic, payload.encode(include_dtypes=True)) for topic, payload in out]

    @staticmethod
    def _metrics(values: dict[str, str], now: int) -> tuple[Any, ...]:
        return tuple(spb.Metric(timestamp=now, name=name, datatype=spb.DataType.STRING, value=values.get(name, ""))
                     for name in DEVICE_METRICS)

    # -- paho callbacks (network thread) ---------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("sparkplug: broker %s refused the connection: %s", self.conn.broker, reason)
            return
        client.subscribe([(self.topic("NCMD"), 1), (self.explanations, 1)])
        self._rebirth()
        log.info("sparkplug: node %s/%s born (bdSeq %d)", self.group, self.node, self._bd)

    def _on_disconnect(self, *_: Any) -> None:
        self.born.clear()
        if not self._stopping:
            self._set_will()  # the next session's death certificate

    def _rebirth(self) -> None:
        with self._lock:
            births = self._births()
        for topic, payload in births:
            self.client.publish(topic, payload, qos=0)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.topic("NCMD"):
                metrics = spb.NCmd.decode(msg.payload).metrics
                if any(m.name == REBIRTH and m.value for m in metrics):
                    log.info("sparkplug: rebirth asked for")
                    self._rebirth()
            elif msg.payload and not msg.retain:
                self._on_explanation(msg.payload)
        except Exception:  # noqa: BLE001 - one bad message must never stop the node
            log.exception("sparkplug: unexpected error handling a message on %s", msg.topic)

    def _on_explanation(self, payload: bytes) -> None:
        data = proto.decode_json(payload, MAX_EXPLANATION_BYTES)
        machine = data.get("machine") if isinstance(data, dict) else None
        if not isinstance(machine, str) or not machine:
            return
        answer = data.get("explanation") if isinstance(data.get("explanation"), dict) else {}
        values = {"Explanation/Summary": str(answer.get("summary", "")),
                  "Explanation/Severity": str(answer.get("severity", "")),
                  "Explanation/Sensor": str(data.get("sensor", "")),
                  "Explanation/JSON": json.dumps(data, separators=(",", ":"))}
        device = device_id(machine)
        now = spb.get_current_timestamp()
        with self._lock:
            new = device not in self._devices
            if new and len(self._devices) >= MAX_DEVICES:
                log.warning("sparkplug: %d devices born already; %r is not published", MAX_DEVICES, machine)
                return
            self._devices[device] = values
            messages = []
            if new:
                messages.append((self.topic("DBIRTH", device),
                                 spb.DBirth(timestamp=now, seq=self._next_seq(), metrics=self._metrics(values, now))))
            messages.append((self.topic("DDATA", device),
                             spb.DData(timestamp=now, seq=self._next_seq(), metrics=self._metrics(values, now))))
        for topic, message in messages:
            self.client.publish(topic, message.encode(include_dtypes=True), qos=0)

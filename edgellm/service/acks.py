"""Acknowledging a QoS 1 request only once its answer is out, so a crash never loses it.

paho acknowledges an incoming message as soon as `on_message` returns; a service killed
before it has answered (kill -9, power cut, OOM) has then taken the request from the broker
and lost it. With paho's manual acknowledgement the service's persistent session keeps every
request unacknowledged until the reply that ends it (final, error, refusal) has itself been
acknowledged by the broker: a restarted service with the same client id is handed it again
(flagged DUP). Waiting for the reply's own PUBACK, not just for `publish` to return, matters:
paho holds QoS 1 messages back while its outgoing window is full, and the request's PUBACK
must never reach the broker before the reply it waits for.
"""
from __future__ import annotations

import threading
from typing import Any, Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

Deliveries = tuple[int, ...]  # packet ids of QoS 1 messages received and not yet acknowledged


def delivery(msg: mqtt.MQTTMessage) -> Deliveries:
    """What acknowledging `msg` takes: its packet id at QoS 1, nothing at QoS 0."""
    return (msg.mid,) if msg.qos == 1 else ()


class Acks:
    """Publishes replies and acknowledges the deliveries each one answers once the broker has it.

    paho calls `on_publish` on its network thread, holding its own lock, and may do so before
    `publish` has returned the reply's packet id to the thread that published it; replies
    acknowledged in that gap are remembered (only while a publish is under way) and matched
    when the id is known.
    """

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._waiting: dict[int, Deliveries] = {}  # reply packet id -> deliveries it answers
        self._publishing = 0
        self._early: set[int] = set()  # replies acknowledged while a publish was under way
        client.on_publish = self._on_publish

    def publish(self, topic: str, payload: bytes, properties: Properties | None, answers: Deliveries = ()) -> None:
        """Publish at QoS 1 from any thread; `answers` are acknowledged once the broker has the reply.

        Raises ValueError for a topic paho refuses; `answers` are then acknowledged at once."""
        with self._lock:
            self._publishing += 1
        info = None
        try:
            info = self.client.publish(topic, payload, qos=1, properties=properties)
        finally:
            with self._lock:
                self._publishing -= 1
                # Not queued (a topic paho refuses, its queue full): no acknowledgement will come to wait for.
                queued = info is not None and info.rc != mqtt.MQTT_ERR_QUEUE_SIZE
                wait = queued and info.mid not in self._early
                if queued:
                    self._early.discard(info.mid)
                if wait and answers:
                    self._waiting[info.mid] = answers
                if not self._publishing:
                    self._early.clear()  # packet ids are reused: none may outlive the publishes it was kept for
            if not wait:
                self.now(answers)

    def now(self, answers: Iterable[int]) -> None:
        """Acknowledge `answers` without waiting for anything."""
        for mid in answers:
            self.client.ack(mid, 1)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        with self._lock:
            answers = self._waiting.pop(mid, None)
            if answers is None and self._publishing:
                self._early.add(mid)
        if answers:
            self.now(answers)

"""The MQTT service: requests in, `Model.stream` chunks out. No generation logic lives here.

One worker thread runs one generation at a time (the model is not thread-safe);
paho's network thread only validates, routes and queues. Replies go out at QoS 1:
paho keeps unacknowledged and not-yet-sent QoS 1 messages and sends them after a
reconnect, so a generation that finishes while the broker is away still reaches
its device.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Iterator, Protocol

import paho.mqtt.client as mqtt

from .. import __version__
from ..errors import GenerationError, RequestError
from . import protocol as proto
from .connection import Connection, connect_async, make_client, publish_properties, refusal

log = logging.getLogger("edgellm.service")


class StreamingModel(Protocol):
    """What the service needs of `edgellm.Model`."""

    manifest: Any
    max_context: int

    def stream(self, prompt: Any, **params: Any) -> Iterator[Any]: ...


@dataclass(frozen=True)
class ServiceConfig:
    device_id: str = "edge"
    topic_prefix: str = "edgellm"
    client_id: str | None = None
    shared_group: str | None = None
    queue_size: int = 8
    session_expiry: int = 3600
    max_payload: int = proto.DEFAULT_MAX_PAYLOAD
    recent_ids: int = 1024
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0

    def resolved_client_id(self) -> str:
        """Stable by default, so the broker keeps our session; members of a shared group
        must differ, or each connection would take over the other's session."""
        if self.client_id:
            return self.client_id
        if self.shared_group:
            return f"edgellm-{self.device_id}-{socket.gethostname()}-{os.getpid()}"
        return f"edgellm-{self.device_id}"


@dataclass(frozen=True)
class Route:
    """Where the replies of one request go."""

    topic: str
    correlation: bytes | None = None


@dataclass
class Job:
    request: proto.Request
    route: Route
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[str, bytes | None, str]:
        """Devices pick ids (often counters from 1): only the same id asking for the same
        reply topic is the same request."""
        return self.route.topic, self.route.correlation, self.request.id


class RecentKeys:
    """A bounded LRU of request keys: a QoS 1 redelivery of a request is not generated twice."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, key: Hashable) -> bool:
        """Remember `key`; False if it was already there."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return True

    def discard(self, key: Hashable) -> None:
        self._keys.pop(key, None)


def _usage(usage: Any) -> dict[str, Any]:
    if usage is None:
        return {}
    data = dataclasses.asdict(usage) if dataclasses.is_dataclass(usage) else dict(usage)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in data.items()}


class Service:
    """Serves one model to the devices of one broker; `start()`, then `stop()`."""

    def __init__(self, model: StreamingModel, conn: Connection, config: ServiceConfig) -> None:
        self.model = model
        self.conn = conn
        self.config = config
        self.topics = proto.Topics(config.topic_prefix, config.device_id)
        if config.shared_group is not None and not proto.valid_id(config.shared_group):
            raise ValueError(f"--shared-group {config.shared_group!r} must be one topic level of A-Z a-z 0-9 _ . : @ -")
        self.client_id = config.resolved_client_id()
        # One status per process: with a shared group, each member's Last Will
        # must only ever mark that member offline.
        self.status_topic = (
            f"{self.topics.status}/{self.client_id}" if config.shared_group else self.topics.status
        )
        self.connected = threading.Event()
        self.finished = threading.Event()
        self.failure: str | None = None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._active: dict[tuple, Job] = {}  # queued or running, for cancel
        self._recent = RecentKeys(config.recent_ids)
        self._lock = threading.Lock()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="edgellm-generate", daemon=True)
        self.client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        client = make_client(self.conn, self.client_id, persistent=True)
        client.will_set(self.status_topic, proto.encode(proto.status_payload("offline")), qos=1, retain=True)
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "Service":
        self._worker.start()
        connect_async(self.client, self.conn, persistent=True, session_expiry=self.config.session_expiry)
        self.client.loop_start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running generation, send what is pending, say offline, disconnect."""
        self._stopping = True
        with self._lock:
            for job in self._active.values():
                job.cancel.set()
        self._jobs.put(None)
        self._worker.join(timeout)
        if self.connected.is_set():
            offline = proto.encode(proto.status_payload("offline"))
            # Replies still pending go out before it: QoS 1 messages leave in order.
            info = self.client.publish(self.status_topic, offline, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("could not publish offline status before disconnecting")
        self.client.disconnect()
        self.client.loop_stop()
        self.finished.set()

    def status(self) -> dict[str, Any]:
        return proto.status_payload(
            "online",
            device=self.config.device_id,
            model=self.model.manifest.name,
            version=__version__,
            capabilities={
                "stream": [True, False, "sentence"],
                "messages": True,
                "max_context": self.model.max_context,
                "max_payload": self.config.max_payload,
                "queue_size": self.config.queue_size,
                "mqtt_version": self.conn.mqtt_version,
                "shared_group": self.config.shared_group,
            },
        )

    # -- paho callbacks (network thread) -------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            fatal = refusal(reason)
            if fatal is None:
                log.warning("broker %s refused the connection (%s); retrying", self.conn.broker, reason)
                return
            self.failure = f"broker {self.conn.broker} refused the connection: {fatal}"
            log.error("%s", self.failure)
            client.disconnect()
            self.finished.set()
            return
        request_topic = self.topics.request
        if self.config.shared_group:
            request_topic = f"$share/{self.config.shared_group}/{request_topic}"
        client.subscribe([(request_topic, 1), (self.topics.cancel, 1)])
        client.publish(self.status_topic, proto.encode(self.status()), qos=1, retain=True)
        self.connected.set()
        log.info(
            "connected to %s as %s (session %s); requests on %s",
            self.conn.broker, self.client_id, "resumed" if flags.session_present else "new", request_topic,
        )

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        log.warning("cannot reach broker %s; retrying with backoff", self.conn.broker)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        if not self._stopping and not self.finished.is_set():
            log.warning("lost broker %s (%s); reconnecting, replies are kept until then", self.conn.broker, reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.topics.cancel:
                self._on_cancel(msg.payload)
            elif msg.topic == self.topics.request:
                self._on_request(msg)
        except Exception:  # noqa: BLE001 - one bad message must never stop the service
            log.exception("unexpected error handling a message on %s", msg.topic)

    def _route(self, msg: mqtt.MQTTMessage, rid: str | None, reply_to: str | None) -> Route:
        """v5 Response Topic (+ Correlation Data), else payload `reply_to`, else the default topic."""
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if proto.valid_topic(response_topic) and not self._own_topic(response_topic):
            return Route(response_topic, correlation)
        if reply_to is not None and not self._own_topic(reply_to):
            return Route(reply_to)
        return Route(self.topics.response(rid) if rid else self.topics.errors)

    def _own_topic(self, topic: str) -> bool:
        """Replies into our own request/cancel/status topics would feed the service itself."""
        return topic in (self.topics.request, self.topics.cancel, self.status_topic)

    def _on_request(self, msg: mqtt.MQTTMessage) -> None:
        try:
            request = proto.parse_request(msg.payload, self.config.max_payload)
        except RequestError as exc:
            rid, reply_to = proto.peek(msg.payload, self.config.max_payload)
            log.info("rejected request %s: %s: %s", rid, exc.code, exc)
            self._send(self._route(msg, rid, reply_to), proto.error_payload(rid, exc.code, str(exc)))
            return
        job = Job(request, self._route(msg, request.id, request.reply_to))
        with self._lock:
            if not self._recent.add(job.key):
                log.info("request %s seen before (QoS 1 redelivery?); not generating it again", request.id)
                return
            if self._jobs.qsize() >= self.config.queue_size:
                self._recent.discard(job.key)  # the device may retry this id later
                busy = f"queue is full ({self.config.queue_size} waiting); retry later"
                self._send(job.route, proto.error_payload(request.id, proto.BUSY, busy))
                return
            self._active[job.key] = job
            self._jobs.put(job)

    def _on_cancel(self, payload: bytes) -> None:
        try:
            rid = proto.parse_cancel(payload)
        except RequestError as exc:
            log.info("ignored cancel: %s", exc)
            return
        with self._lock:
            jobs = [job for job in self._active.values() if job.request.id == rid]
        for job in jobs:
            log.info("cancelling request %s", rid)
            job.cancel.set()

    # -- worker thread -------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._generate(job)
            except GenerationError as exc:
                self._send(job.route, proto.error_payload(job.request.id, proto.BAD_REQUEST, str(exc)))
            except Exception as exc:  # noqa: BLE001 - reported to the device, logged in full here
                log.exception("request %s failed", job.request.id)
                message = f"generation failed: {type(exc).__name__}: {exc}"[:300]
                self._send(job.route, proto.error_payload(job.request.id, proto.INTERNAL, message))
            finally:
                with self._lock:
                    self._active.pop(job.key, None)

    def _generate(self, job: Job) -> None:
        request = job.request
        if job.cancel.is_set():
            self._send(job.route, proto.error_payload(request.id, proto.CANCELLED, "cancelled before it started"))
            return
        splitter = proto.SentenceSplitter() if request.stream == "sentence" else None
        seq, parts, last = 0, [], None

        def emit(delta: str) -> None:
            nonlocal seq
            self._send(job.route, proto.chunk_payload(request.id, seq, delta))
            seq += 1

        for chunk in self.model.stream(request.prompt, **request.params, cancel=job.cancel):
            last = chunk
            if not chunk.text:
                continue
            parts.append(chunk.text)
            if splitter is not None:
                for sentence in splitter.feed(chunk.text):
                    emit(sentence)
            elif request.stream:
                emit(chunk.text)
        if splitter is not None and (rest := splitter.flush()):
            emit(rest)
        finish = getattr(last, "finish_reason", None) or "stop"
        usage = _usage(getattr(last, "usage", None))
        self._send(job.route, proto.final_payload(request.id, "".join(parts), finish, usage))
        log.info("request %s: %s, %s tokens", request.id, finish, usage.get("completion_tokens", "?"))

    def _send(self, route: Route, payload: dict[str, Any]) -> None:
        """QoS 1, from any thread: while disconnected, paho keeps the message and sends it on reconnect."""
        try:
            properties = publish_properties(route.correlation) if self.conn.v5 else None
            self.client.publish(route.topic, proto.encode(payload), qos=1, properties=properties)
        except ValueError as exc:  # a topic paho refuses; the request named it, nothing else to do
            log.warning("cannot publish to %r: %s", route.topic, exc)

"""The MQTT service: requests in, `Model.stream` chunks out. No generation logic lives here.

The engine's worker thread runs the decode loop (one request, or several in a batched step;
the model is not thread-safe) and calls back here with each chunk; paho's network thread
only validates, routes and queues. The engine may be shared with the HTTP front. Replies
go out at QoS 1: paho keeps unacknowledged and not-yet-sent QoS 1 messages and sends them
after a reconnect, so a generation that finishes while the broker is away still reaches
its device. A QoS 1 request is acknowledged only once the reply that ends it is out
(`acks`), so a service that dies is handed its unanswered requests again when it restarts.
"""
from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from .. import __version__
from ..engine import Engine, Outcome, StreamingModel
from ..engine import Job as EngineJob
from ..errors import GenerationError, RequestError
from ..params import GenerationParams
from . import protocol as proto
from .acks import Acks, Deliveries, delivery
from .admission import ACTIVE, RecentRequests
from .connection import Connection, connect_async, connect_failure_reason, make_client, publish_properties, refusal

log = logging.getLogger("edgellm.service")

# Requests are held unacknowledged while queued or running, so the broker must be allowed more
# unacknowledged messages than the queue and the slots hold: beyond them, room for the cancels
# and refusals that must still get through while every place is taken (MQTT 5 Receive Maximum).
RECEIVE_HEADROOM = 16


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
    max_tokens: int = 1024  # the most any one request may generate: one request cannot hold every device for minutes
    per_client: int | None = None  # requests one reply topic may have waiting (default: half the queue)
    reasoning_topic: str | None = None  # every request's reasoning is also published here, for an audit log
    slots: int = 1  # requests decoded together in one batched step (continuous batching)
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
    params: GenerationParams  # the request's, built once where it arrived (`_params`)
    client: str  # whose share of the queue it takes: see `admission`
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    answers: Deliveries = ()  # acknowledged once its final reply is out
    restart: bool = False  # handed again by the broker (DUP): its first reply says the answer starts over

    @property
    def key(self) -> tuple[str, bytes | None, str]:
        """Devices pick ids (often counters from 1): only the same id asking for the same
        reply topic is the same request."""
        return self.route.topic, self.route.correlation, self.request.id


def _usage(usage: Any) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(usage).items()}


def engine_for(model: StreamingModel, config: ServiceConfig) -> Engine:
    """The engine `config`'s queue settings and token ceiling describe."""
    return Engine(model, config.queue_size, config.per_client, config.max_tokens, config.slots)


class Service:
    """Serves one model to the devices of one broker; `start()`, then `stop()`.

    Without an `engine`, it makes its own from `config`; a shared one (MQTT next to
    HTTP) is started and closed by its owner, and `stop()` only cancels this front's jobs."""

    def __init__(self, model: StreamingModel, conn: Connection, config: ServiceConfig,
                 engine: Engine | None = None, embedder: Any = None) -> None:
        self.model = model
        self.embedder = embedder  # a retrieval.embed.Embedder: answers `{base}/embed`
        self.conn = conn
        self.config = config
        self.topics = proto.Topics(config.topic_prefix, config.device_id)
        if config.shared_group is not None and not proto.valid_id(config.shared_group):
            raise ValueError(f"--shared-group {config.shared_group!r} must be one topic level of A-Z a-z 0-9 _ . : @ -")
        if config.reasoning_topic is not None and not proto.valid_topic(config.reasoning_topic):
            raise ValueError(f"--reasoning-topic {config.reasoning_topic!r} must be a topic without wildcards, "
                             "not starting with '$'")
        self.client_id = config.resolved_client_id()
        # One status per process: with a shared group, each member's Last Will
        # must only ever mark that member offline.
        self.status_topic = (
            f"{self.topics.status}/{self.client_id}" if config.shared_group else self.topics.status
        )
        self.connected = threading.Event()
        self.finished = threading.Event()
        self.failure: str | None = None
        self._owns_engine = engine is None
        self.engine = engine_for(model, config) if engine is None else engine
        self._active: dict[tuple, Job] = {}  # queued or running, for cancel
        self._recent = RecentRequests(config.recent_ids)
        self.max_packet = proto.packet_limit(config.max_payload)
        self.receive_maximum = min(config.queue_size + self.engine.slots + RECEIVE_HEADROOM, 65535)
        self._lock = threading.Lock()
        self._stopping = False
        self.client = self._make_client()
        self.acks = Acks(self.client)

    def _make_client(self) -> mqtt.Client:
        client = make_client(self.conn, self.client_id, persistent=True, max_packet=self.max_packet,
                             manual_ack=True)
        client.will_set(self.status_topic, proto.encode(proto.status_payload("offline")), qos=1, retain=True)
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "Service":
        if self._owns_engine:
            self.engine.start()
        connect_async(self.client, self.conn, persistent=True, session_expiry=self.config.session_expiry,
                      receive_maximum=self.receive_maximum)
        self.client.loop_start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running generation, send what is pending, say offline, disconnect."""
        self._stopping = True
        with self._lock:
            for job in self._active.values():
                job.cancel.set()
        if self._owns_engine:
            self.engine.close(timeout)
        else:
            self._wait_for_finals(timeout)
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
                "max_tokens": self.config.max_tokens,
                "queue_size": self.config.queue_size,
                "slots": self.engine.slots,
                "mqtt_version": self.conn.mqtt_version,
                "shared_group": self.config.shared_group,
                "embedding": self.embedder.model.name if self.embedder is not None else None,
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
        # Retain As Published: a request published with the retain flag is seen as such, and refused.
        options = SubscribeOptions(qos=1, retainAsPublished=True) if self.conn.v5 else 1
        embed = [(self.topics.embed, options)] if self.embedder is not None else []
        client.subscribe([(request_topic, options), (self.topics.cancel, options), *embed])
        client.publish(self.status_topic, proto.encode(self.status()), qos=1, retain=True)
        self.connected.set()
        log.info(
            "connected to %s as %s (session %s); requests on %s",
            self.conn.broker, self.client_id, "resumed" if flags.session_present else "new", request_topic,
        )

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        log.warning("cannot connect to broker %s: %s; retrying with backoff", self.conn.broker,
                    connect_failure_reason(self.client))

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        if not self._stopping and not self.finished.is_set():
            log.warning("lost broker %s (%s); reconnecting, replies are kept until then", self.conn.broker, reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        """Every path acknowledges the message, at once or with the reply that ends it: one left
        unacknowledged holds a place of the broker's window (Receive Maximum) until a restart."""
        answers = delivery(msg)
        try:
            if not msg.payload:
                self.acks.now(answers)  # how MQTT deletes a retained message (ours included), never a request
            elif msg.topic == self.topics.cancel:
                self._on_cancel(msg, answers)
            elif msg.topic == self.topics.request:
                self._on_request(msg, answers)
            elif msg.topic == self.topics.embed and self.embedder is not None:
                self._on_embed(msg, answers)
            else:
                self.acks.now(answers)
        except Exception:  # noqa: BLE001 - one bad message must never stop the service
            log.exception("unexpected error handling a message on %s", msg.topic)
            rid = proto.peek_id(msg.payload)
            self._send(self._fallback_route(rid),
                       proto.error_payload(rid, proto.INTERNAL, "the service failed to read this message"), answers)

    def _route(self, msg: mqtt.MQTTMessage, rid: str | None, reply_to: str | None) -> Route:
        """v5 Response Topic (+ Correlation Data), else payload `reply_to`, else the default topic.

        A reply topic that is refused raises RequestError; its error goes to the default topic."""
        props = msg.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if correlation is not None and len(correlation) > proto.MAX_CORRELATION:
            raise RequestError(proto.BAD_REQUEST, f"Correlation Data is {len(correlation)} bytes, "
                                                  f"limit is {proto.MAX_CORRELATION}")
        for name, topic in (("Response Topic", response_topic), ("field 'reply_to'", reply_to)):
            if topic is None:
                continue
            if (problem := self.topics.reply_problem(topic)) is not None:
                raise RequestError(proto.BAD_REQUEST, f"{name} {topic[:80]!r} {problem}")
            return Route(topic, correlation if name == "Response Topic" else None)
        return self._fallback_route(rid)

    def _fallback_route(self, rid: str | None) -> Route:
        return Route(self.topics.response(rid) if rid else self.topics.errors)

    def _refuse(self, msg: mqtt.MQTTMessage, rid: str | None, reply_to: str | None, code: str, message: str,
                answers: Deliveries) -> None:
        """An error for a message on `msg`'s reply topic, or on the default one if that is refused too."""
        try:
            route = self._route(msg, rid, reply_to)
        except RequestError:
            route = self._fallback_route(rid)
        log.info("refused %s %s: %s: %s", msg.topic, rid, code, message)
        error = proto.error_payload(rid, code, message)
        again = msg.dup and msg.topic == self.topics.request
        self._send(route, proto.restarted(error) if again else error, answers)

    def _on_request(self, msg: mqtt.MQTTMessage, answers: Deliveries) -> None:
        size = self.client.oversized(msg)
        if size is not None:
            limit = self.config.max_payload
            self._refuse(msg, proto.peek_id(msg.payload), None, proto.TOO_LARGE,
                         f"payload is {size} bytes, limit is {limit}", answers)
            return
        if msg.retain:
            # Retained, it would be answered again at every start of every service: delete it.
            self.client.publish(msg.topic, b"", qos=1, retain=True)
            # On MQTT 3.1.1 the flag cannot be trusted to mean a retained copy (amqtt sets it on
            # messages it queued for our offline session), so there it is only deleted.
            if self.conn.v5:
                rid, reply_to = proto.peek(msg.payload, self.config.max_payload)
                self._refuse(msg, rid, reply_to, proto.BAD_REQUEST,
                             "retained requests are not answered (and this one was deleted): publish without retain",
                             answers)
                return
        try:
            request = proto.parse_request(msg.payload, self.config.max_payload)
            route = self._route(msg, request.id, request.reply_to)
            params = self._params(request)
        except RequestError as exc:
            rid, reply_to = proto.peek(msg.payload, self.config.max_payload)
            self._refuse(msg, rid, reply_to, exc.code, str(exc), answers)
            return
        self._admit(Job(request, route, params, client=self._client_of(route), answers=answers, restart=msg.dup))

    def _on_embed(self, msg: mqtt.MQTTMessage, answers: Deliveries) -> None:
        """An embed request, computed on a thread of its own (never the network thread) once the
        embedder admits it; 'busy' at once, on this thread, when its few places to wait are taken."""
        try:
            request = proto.parse_embed(msg.payload, self.config.max_payload)
            route = self._route(msg, request.id, request.reply_to)
        except RequestError as exc:
            rid, reply_to = proto.peek(msg.payload, self.config.max_payload)
            self._refuse(msg, rid, reply_to, exc.code, str(exc), answers)
            return

        try:
            self.embedder.admit(len(request.texts))
        except RequestError as exc:
            self._send(route, proto.error_payload(request.id, exc.code, str(exc)), answers)
            return

        def run() -> None:
            try:
                vectors, tokens = self.embedder.admitted(request.texts)
            except GenerationError as exc:
                self._send(route, proto.error_payload(request.id, proto.BAD_REQUEST, str(exc)), answers)
            else:
                self._send(route, {"id": request.id, "done": True, "embeddings": vectors.tolist(),
                                   "model": self.embedder.model.name, "usage": {"prompt_tokens": tokens}}, answers)

        threading.Thread(target=run, name="edgellm-embed", daemon=True).start()

    def _params(self, request: proto.Request) -> GenerationParams:
        """The request's parameters built once (`Engine.params`: the bundle's defaults, the service's
        token ceiling); RequestError for one refused, or when its prompt is too long for the context
        to be worth queueing (`Engine.cannot_fit`)."""
        try:
            params = self.engine.params(request.params)
        except GenerationError as exc:
            raise proto.bad_params(exc) from None
        if (refusal := self.engine.cannot_fit(request.prompt, params)) is not None:
            raise RequestError(proto.BAD_REQUEST, refusal)
        return params

    def _client_of(self, route: Route) -> str:
        return self.topics.response("") if route.topic.startswith(self.topics.response("")) else route.topic

    def _admit(self, job: Job) -> None:
        """Queue a new request; the same request again (same id, same reply topic) is not
        generated twice: still running, its replies already go to that topic; answered, its
        final reply is sent again.

        The broker hands a message again (DUP) only when it was not acknowledged: one this
        process answered is acknowledged without a second final reply (paho sends the first
        again if the broker lacks it); one it never saw was accepted by a service that died,
        and is answered from the start."""
        rid = job.request.id
        seen = self._recent.claim(job.key)
        if seen == ACTIVE:
            log.info("request %s sent again while being answered; its replies are on their way", rid)
            with self._lock:
                running = self._active.get(job.key)
            if running is None or running.answers != job.answers:  # not the running one's own delivery
                self.acks.now(job.answers)
            return
        if seen is not None:
            if job.restart:
                self.acks.now(job.answers)
                return
            log.info("request %s answered before; sending its final reply again", rid)
            self._send_encoded(job.route, seen, job.answers)
            return
        if job.restart:
            log.info("request %s handed again by the broker: a service stopped before answering it; "
                     "answering it from the start", rid)
        with self._lock:
            refusal_reason = self.engine.submit(self._engine_job(job))
            if refusal_reason is None:
                self._active[job.key] = job
        if refusal_reason is not None:
            self._recent.forget(job.key)  # the device may retry this id later
            busy = proto.error_payload(rid, proto.BUSY, refusal_reason)
            self._send(job.route, proto.restarted(busy) if job.restart else busy, job.answers)

    def _on_cancel(self, msg: mqtt.MQTTMessage, answers: Deliveries) -> None:
        """Errors go to the cancel's own Response Topic, else to the errors topic with no id:
        never to the request's reply topic, where they would read as that request's answer."""
        try:
            rid, key = proto.parse_cancel(msg.payload)
        except RequestError as exc:
            self._refuse(msg, None, None, exc.code, str(exc), answers)
            return
        with self._lock:
            jobs = [job for job in self._active.values() if job.request.id == rid and job.request.cancel_key
                    and hmac.compare_digest(job.request.cancel_key.encode(), key.encode())]
        if not jobs:
            self._refuse(msg, None, None, proto.FORBIDDEN, f"cancel of {rid}: no queued or running request "
                                                           "with that id has that cancel_key", answers)
            return
        for job in jobs:
            log.info("cancelling request %s", rid)
            job.cancel.set()
        self.acks.now(answers)

    # -- engine worker thread --------------------------------------------------

    def _wait_for_finals(self, timeout: float) -> None:
        """With a shared engine, this front's cancelled jobs still send their final replies
        (before the offline status): wait for them, not for the other fronts' jobs."""
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            time.sleep(0.02)

    def _engine_job(self, job: Job) -> EngineJob:
        """The engine's view of `job`: its chunks become chunk replies, its end the final reply.

        Reasoning and tool-call deltas ride on the chunks of a token stream; a sentence
        stream (for a TTS) carries only the answer, and the final reply has everything."""
        request = job.request
        splitter = proto.SentenceSplitter() if request.stream == "sentence" else None
        seq = 0

        def first(reply: dict[str, Any]) -> dict[str, Any]:
            return proto.restarted(reply) if job.restart and seq == 0 else reply

        def emit(delta: str, reasoning: str = "", tool_calls: list[dict[str, Any]] | None = None) -> None:
            nonlocal seq
            self._send(job.route, first(proto.chunk_payload(request.id, seq, delta, reasoning, tool_calls)))
            seq += 1

        def on_chunk(chunk: Any) -> None:
            if splitter is not None:
                for sentence in splitter.feed(chunk.text):
                    emit(sentence)
            elif request.stream and (chunk.text or chunk.reasoning or chunk.tool_calls):
                emit(chunk.text, chunk.reasoning, chunk.tool_calls)

        def final(outcome: Outcome) -> dict[str, Any]:
            if outcome.waited_out:
                return proto.error_payload(request.id, proto.CANCELLED, "cancelled before it started")
            if isinstance(outcome.error, GenerationError):
                return proto.error_payload(request.id, proto.BAD_REQUEST, str(proto.bad_params(outcome.error)))
            if outcome.error is not None:
                exc = outcome.error
                log.error("request %s failed", request.id, exc_info=exc)
                message = f"generation failed: {type(exc).__name__}: {exc}"[:300]
                return proto.error_payload(request.id, proto.INTERNAL, message)
            if splitter is not None and (rest := splitter.flush()):
                emit(rest)
            result = outcome.last.result
            usage = _usage(result.usage)
            log.info("request %s: %s, %s tokens", request.id, result.finish_reason, result.usage.completion_tokens)
            return proto.final_payload(request.id, result.text, result.finish_reason, usage,
                                       incomplete=result.incomplete, reasoning=result.reasoning,
                                       tool_calls=result.tool_calls, citations=result.citations)

        def on_end(outcome: Outcome) -> None:
            try:
                reply = final(outcome)
            except Exception as exc:  # noqa: BLE001 - reported to the device, logged in full here
                log.exception("request %s failed", request.id)
                reply = proto.error_payload(request.id, proto.INTERNAL,
                                            f"generation failed: {type(exc).__name__}: {exc}"[:300])
            encoded = proto.encode(reply)  # what a retry of the same id is sent again
            sent = first(reply)
            self._send_encoded(job.route, encoded if sent is reply else proto.encode(sent), job.answers)
            if self.config.reasoning_topic and reply.get("reasoning"):
                self._send(Route(self.config.reasoning_topic), {
                    "id": request.id, "reply_topic": job.route.topic, "reasoning": reply["reasoning"],
                    "finish_reason": reply["finish_reason"]})
            self._recent.finish(job.key, encoded)
            with self._lock:
                self._active.pop(job.key, None)

        return EngineJob(request.prompt, job.params, job.client, on_chunk, on_end, job.cancel,
                         tenant=f"mqtt:{job.route.topic}")  # the reply topic (docs/mqtt.md, prompt privacy)

    def _send(self, route: Route, payload: dict[str, Any], answers: Deliveries = ()) -> None:
        self._send_encoded(route, proto.encode(payload), answers)

    def _send_encoded(self, route: Route, payload: bytes, answers: Deliveries = ()) -> None:
        """QoS 1, from any thread: while disconnected, paho keeps the message and sends it on reconnect.
        `answers` (the requests this reply ends) are acknowledged once the broker has it."""
        try:
            properties = publish_properties(route.correlation) if self.conn.v5 else None
            self.acks.publish(route.topic, payload, properties, answers)
        except ValueError as exc:  # a topic paho refuses; the request named it, nothing else to do
            log.warning("cannot publish to %r: %s", route.topic, exc)

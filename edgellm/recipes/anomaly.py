"""The anomaly-explanation recipe: sensor events in, JSON explanations out, over MQTT.

It is a client of the running service, like any device: each explanation is an ordinary
request with a `response_format` published to the service's request topic, answered on the
recipe's own reply topic. So it shares the service's one engine and queue and holds no
generation logic. It keeps only `in_flight` requests at the service (1 by default): in a storm
the waiting work piles up in its own bounded queue, where it is coalesced and the oldest is
dropped, not in the service's queue, where it would crowd out every other device.

Threads: paho's network thread validates events and replies and queues them; one worker
sends due requests, times out lost ones and publishes the status, all under one lock.
Publishing happens outside the lock.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import paho.mqtt.client as mqtt
from jinja2 import TemplateError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..errors import RequestError, RetrievalError
from ..service import protocol as proto
from ..service.connection import Connection, connect_async, connect_failure_reason, make_client, refusal
from .config import SCHEMA, AnomalyConfig, reply_topic, response_format, template_line
from .events import Coalescer, Group, parse_event
from .facts import Facts, facts, request_schema, variables
from .manual import Section, cited

log = logging.getLogger("edgellm.recipes.anomaly")

STATUS_INTERVAL = 1.0  # seconds between retained status updates in a storm
RETRY_S = 2.0  # after the service answered `busy`
SESSION_EXPIRY = 3600  # events published while the recipe restarts wait for it at the broker
TIMEOUT = "timeout"  # the recipe's own error code: the service never answered


@dataclass
class Counts:
    received: int = 0  # valid events
    malformed: int = 0  # events refused and reported on the error topic
    explained: int = 0  # explanations published complete and valid
    incomplete: int = 0  # explanations published marked incomplete (the token budget ran out)
    failed: int = 0  # groups the service refused or never answered, reported on the error topic


@dataclass
class Flight:
    group: Group
    deadline: float
    sections: list[Section]  # the manual sections its prompt showed, for the citations


Message = tuple[str, bytes, "Properties | None", bool]  # topic, payload, properties, retain


class AnomalyRecipe:
    """Explains the events of `config.events` through the service at `topics`; `start()`, then `stop()`."""

    def __init__(self, conn: Connection, topics: proto.Topics, config: AnomalyConfig, *,
                 client_id: str | None = None) -> None:
        self.conn = conn
        self.topics = topics
        self.config = config
        self.client_id = client_id or f"edgellm-{topics.device}-anomaly"
        self.reply_topic = reply_topic(topics)
        self._run = uuid.uuid4().hex[:8]  # request ids differ across restarts: the service replays old ones
        self._seq = 0
        self.counts = Counts()
        self._queue = Coalescer(config.window, config.queue_size)
        self._in_flight: dict[str, Flight] = {}
        self._cond = threading.Condition()
        self._wake = False
        self._dirty = True
        self._status_at = 0.0
        self._stopping = False
        self.ready = threading.Event()  # subscribed to events and replies
        self.max_packet = proto.packet_limit(config.max_event_bytes)
        self._worker = threading.Thread(target=self._work, name="edgellm-anomaly", daemon=True)
        self.client = make_client(conn, self.client_id, persistent=True, max_packet=self.max_packet)
        self.client.will_set(config.status, proto.encode({"state": "offline", "recipe": "anomaly"}), qos=1,
                             retain=True)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "AnomalyRecipe":
        self._worker.start()
        connect_async(self.client, self.conn, persistent=True, session_expiry=SESSION_EXPIRY)
        self.client.loop_start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending, say offline (with the final counts), disconnect. Requests still at the
        service are answered to a session nobody reads until the next start, which ignores them."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._worker.join(timeout)
        if self.ready.is_set():
            info = self.client.publish(self.config.status, proto.encode(self.status("offline")), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("could not publish the recipe's offline status before disconnecting")
        self.client.disconnect()
        self.client.loop_stop()

    def status(self, state: str = "online") -> dict[str, Any]:
        with self._cond:
            return {"state": state, "recipe": "anomaly", "events": self.config.events, "service": self.topics.request,
                    "queued": len(self._queue), "in_flight": len(self._in_flight),
                    "coalesced": self._queue.coalesced, "dropped": self._queue.dropped,
                    **dataclasses.asdict(self.counts)}

    # -- paho callbacks (network thread) -------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("anomaly recipe: broker %s refused the connection: %s", self.conn.broker,
                      refusal(reason) or reason)
            return
        # An event is something that happened, not a state: a retained one is not explained again at every start.
        events = SubscribeOptions(qos=1, retainHandling=2) if self.conn.v5 else 1
        client.subscribe([(self.config.events, events), (self.reply_topic, SubscribeOptions(qos=1) if self.conn.v5
                                                         else 1)])

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        if any(code.is_failure for code in codes):
            log.error("anomaly recipe: the broker refused the subscription to %s or %s (%s); check its ACLs",
                      self.config.events, self.reply_topic, [str(c) for c in codes])
            return
        log.info("anomaly recipe: explaining events on %s through %s; explanations to %s, errors to %s",
                 self.config.events, self.topics.request, self.config.output, self.config.errors)
        self.ready.set()
        self._notify(dirty=True)

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        log.warning("anomaly recipe: cannot connect to broker %s: %s; retrying", self.conn.broker,
                    connect_failure_reason(self.client))

    def _on_disconnect(self, *_: Any) -> None:
        self.ready.clear()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return  # a retained message being deleted
        try:
            if msg.topic == self.reply_topic:
                self._on_reply(msg)
            elif not msg.retain:
                self._on_event(msg)
        except Exception:  # noqa: BLE001 - one bad message must never stop the recipe
            log.exception("anomaly recipe: unexpected error handling a message on %s", msg.topic)

    def _on_event(self, msg: mqtt.MQTTMessage) -> None:
        size = self.client.oversized(msg)
        try:
            if size is not None:
                raise RequestError(proto.TOO_LARGE, f"payload is {size} bytes, limit is {self.config.max_event_bytes}")
            event = parse_event(msg.payload, self.config.max_event_bytes)
        except RequestError as exc:
            rid = proto.peek_id(msg.payload) if exc.code == proto.TOO_LARGE else \
                proto.peek(msg.payload, self.config.max_event_bytes)[0]
            log.info("anomaly recipe: refused an event on %s: %s", msg.topic, exc)
            with self._cond:
                self.counts.malformed += 1
            self._publish(self.config.errors, {**proto.error_payload(rid, exc.code, str(exc)), "topic": msg.topic})
            self._notify(dirty=True)
            return
        with self._cond:
            self.counts.received += 1
            self._queue.add(event, time.monotonic())
        self._notify(dirty=True)

    def _on_reply(self, msg: mqtt.MQTTMessage) -> None:
        try:
            data = json.loads(msg.payload) if self.client.oversized(msg) is None else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            log.warning("anomaly recipe: unreadable reply on %s ignored", msg.topic)
            return
        if not (data.get("done") or data.get("status") == "error"):
            return  # a chunk: requests ask for none, but a reply topic is public
        error = data.get("error") if data.get("status") == "error" else None
        code = error.get("code") if isinstance(error, dict) else None
        with self._cond:
            flight = self._in_flight.pop(str(data.get("id")), None)
            if flight is None:
                return  # an answer to an earlier run, or one sent again
            group, out = flight.group, None
            if code == proto.BUSY:
                self._queue.requeue(group, time.monotonic() + RETRY_S)
            elif error is None and (out := explanation(group, data, self._facts(group),
                                                        flight.sections)) is not None:
                self.counts.incomplete += out["incomplete"]
                self.counts.explained += not out["incomplete"]
            else:
                self.counts.failed += 1
        self._notify(dirty=True)
        if code == proto.BUSY:
            log.info("anomaly recipe: the service is busy; %s:%s again in %gs", *group.key, RETRY_S)
        elif out is not None:
            self._publish(self.config.output_topic(*group.key), out)
        elif isinstance(error, dict):
            self._fail(group, str(code), str(error.get("message")))
        else:
            self._fail(group, proto.INTERNAL, "the service's answer is not a JSON object")

    # -- worker thread -------------------------------------------------------

    def _notify(self, dirty: bool = False) -> None:
        with self._cond:
            self._dirty |= dirty
            self._wake = True
            self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._wake:
                    self._cond.wait(self._idle_s())
                self._wake = False
                if self._stopping:
                    return
                messages, lost = self._due(time.monotonic())
            for flight in lost:
                self._fail(flight.group, TIMEOUT, f"no answer from the service on {self.topics.request} within "
                                                  f"{self.config.timeout:g}s")
            for topic, payload, props, retain in messages:
                self.client.publish(topic, payload, qos=1, properties=props, retain=retain)

    def _idle_s(self) -> float:
        """How long the worker may sleep: until the next group is due, a request times out or a
        status update is allowed; at most a second."""
        times = [flight.deadline for flight in self._in_flight.values()]
        if self.ready.is_set():  # else on_subscribe wakes the worker
            if (due := self._queue.next_due()) is not None and len(self._in_flight) < self.config.in_flight:
                times.append(due)
            if self._dirty:
                times.append(self._status_at)
        return min(max(min(times, default=1e9) - time.monotonic(), 0.01), 1.0)

    def _due(self, now: float) -> tuple[list[Message], list[Flight]]:
        """Under the lock: requests to send, requests given up on, and the status if it is time."""
        messages: list[Message] = []
        lost = [self._in_flight.pop(rid) for rid, f in list(self._in_flight.items()) if f.deadline <= now]
        self.counts.failed += len(lost)
        self._dirty |= bool(lost)
        while self.ready.is_set() and len(self._in_flight) < self.config.in_flight:
            group = self._queue.pop_due(now)
            if group is None:
                break
            self._dirty = True
            try:
                messages.append(self._request(group, now))
            except TemplateError as exc:
                self.counts.failed += 1
                where = f"{self.config.prompt} line {template_line(exc)}"
                failure = _group_error(group, proto.INTERNAL, f"the prompt template {where} failed: {exc}")
                messages.append(self._message(self.config.errors, failure))
        if self._dirty and now >= self._status_at and self.ready.is_set():
            self._dirty = False
            self._status_at = now + STATUS_INTERVAL
            messages.append(self._message(self.config.status, self.status(), retain=True))
        return messages, lost

    def _request(self, group: Group, now: float) -> Message:
        self._seq += 1
        rid = f"anomaly-{self._run}-{self._seq}"
        found = self._facts(group)
        sections = self._sections(group, found)
        body = request_body(self.config, group, found, [(s.id, s.prompt_text()) for s in sections])
        request = {"id": rid, **body, "stream": False}
        props = None
        if self.conn.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = rid.encode()
        else:
            request["reply_to"] = self.reply_topic
        self._in_flight[rid] = Flight(group, now + self.config.timeout, sections)
        log.info("anomaly recipe: explaining %d event(s) of %s:%s as request %s", group.count, *group.key, rid)
        return self.topics.request, proto.encode(request), props, False

    def _facts(self, group: Group) -> Facts:
        return facts(group, self.config.bands.get(group.first.sensor))

    def _sections(self, group: Group, found: Facts) -> list[Section]:
        """The manual's sections for `group` (a query embedded and searched: milliseconds, on the
        worker, under the lock); none without a manual, or when the index cannot be read now, which
        is logged and costs the explanation its citations, not the explanation."""
        if self.config.manual is None:
            return []
        try:
            return self.config.manual.sections(group, found)
        except (RetrievalError, sqlite3.Error, OSError) as exc:
            log.warning("anomaly recipe: %s:%s explained without the manual: %s", *group.key, exc)
            return []

    @staticmethod
    def _message(topic: str, payload: dict[str, Any], retain: bool = False) -> Message:
        return topic, proto.encode(payload), None, retain

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.client.publish(topic, proto.encode(payload), qos=1)

    def _fail(self, group: Group, code: str, message: str) -> None:
        log.warning("anomaly recipe: %s:%s not explained: %s: %s", *group.key, code, message)
        self._publish(self.config.errors, _group_error(group, code, message))


def shared_prompt(config: AnomalyConfig) -> list[dict[str, str]]:
    """The messages every explanation request starts with, for the service to declare shared
    (`Model.share_prefix`; `edgellm serve --recipe` does): its rows then serve the recipe's next
    request from their own copy, however many devices' requests came between."""
    return [{"role": "system", "content": config.system}]


def request_body(config: AnomalyConfig, group: Group, found: Facts,
                 sections: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The messages and generation fields explaining `group`: the prompt with the computed facts
    (and retrieved `sections`, (id, text) pairs), the answer held to this group's grammar."""
    prompt = config.template.render(**group.variables(), **variables(found, sections))  # type: ignore[union-attr]
    schema = request_schema(SCHEMA, found, [section_id for section_id, _ in sections])
    return {"messages": [*shared_prompt(config), {"role": "user", "content": prompt}], **config.params(),
            "response_format": response_format(schema)}


def _group_error(group: Group, code: str, message: str) -> dict[str, Any]:
    return {**proto.error_payload(group.first.id, code, message), "machine": group.first.machine,
            "sensor": group.first.sensor, "events": group.summary()}


def explanation(group: Group, final: dict[str, Any], found: Facts,
                sections: Sequence[Section] = ()) -> dict[str, Any] | None:
    """The payload published for `group` from the service's final reply; None when a reply that
    claims to be complete is not a JSON object (never published as if it were valid). The
    computed severity goes into the explanation and, with the band, into `facts`; the manual
    `sections` its evidence cites into `citations` (file, heading, lines).

    An answer cut short by the token budget is published marked incomplete, with no
    `explanation` and its partial text, so a dashboard never parses half an object as a whole one."""
    finish = final.get("finish_reason")
    out: dict[str, Any] = {"id": group.first.id, "machine": group.first.machine, "sensor": group.first.sensor,
                           "events": group.summary(), "facts": _published(found), "citations": [],
                           "finish_reason": finish, "usage": final.get("usage") or {}}
    text = final.get("text")
    if final.get("incomplete") or finish != "stop":
        return {**out, "incomplete": True, "explanation": None, "partial_text": text if isinstance(text, str) else ""}
    try:
        answer = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    if not isinstance(answer, dict):
        return None
    # The grammar holds each item to the facts or the causes but cannot keep them apart: the same one twice once.
    lists = {key: list(dict.fromkeys(answer[key])) for key in ("likely_causes", "evidence") if key in answer}
    # The grammar has the model write the sentences last (and no key the schema lacks); published
    # in the schema's order, summary first, as before.
    ordered = {key: answer[key] for key in SCHEMA["properties"] if key in answer}
    return {**out, "citations": cited(sections, lists.get("evidence", [])), "incomplete": False,
            "explanation": {**ordered, **lists, "severity": found.severity}}


def _published(found: Facts) -> dict[str, Any]:
    band = [found.band.low, found.band.high] if found.band is not None else None
    return {"severity": found.severity, "worst": found.worst, "band": band, "excess": round(found.excess, 3)}

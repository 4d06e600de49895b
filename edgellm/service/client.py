"""`edgellm ask`: one request to a running `edgellm serve`, its replies as they come.

MQTT v5 asks for replies with Response Topic + Correlation Data; 3.1.1 has neither,
so the request carries `reply_to` instead. Either way the reply topic is unique
to this request.
"""
from __future__ import annotations

import json
import logging
import queue
import uuid
from typing import Any, Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..errors import RequestError
from . import protocol as proto
from .connection import Connection, connect_async, make_client, over_311, refusal, refuses_v5

log = logging.getLogger("edgellm.service")


class AskTimeout(RequestError):
    """No reply in time. Like "refused", its code is the client's own and never on the wire."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class VersionRefused(RequestError):
    """The broker refuses MQTT 5 (amqtt speaks only 3.1.1): `ask(downgrade=True)` asks again over 3.1.1."""

    def __init__(self, message: str) -> None:
        super().__init__("refused", message)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def ask(
    conn: Connection, topics: proto.Topics, request: dict[str, Any], timeout: float = 120.0,
    *, downgrade: bool = False,
) -> Iterator[dict[str, Any]]:
    """Publish `request` (it must have an `id`) and yield reply payloads up to the final one.

    Raises RequestError for an error reply or a refused connection, AskTimeout when
    nothing more arrives within `timeout` seconds of the last reply. With `downgrade`,
    a broker that refuses MQTT 5 is asked again over 3.1.1.
    """
    try:
        yield from _ask(conn, topics, request, timeout)
    except VersionRefused:
        if not (downgrade and conn.v5):
            raise
        yield from _ask(over_311(conn), topics, request, timeout)


def _ask(conn: Connection, topics: proto.Topics, request: dict[str, Any], timeout: float) -> Iterator[dict[str, Any]]:
    rid = request["id"]
    reply_topic = topics.response(rid)
    replies: queue.Queue[tuple[str, Any]] = queue.Queue()
    client = make_client(conn, f"edgellm-ask-{rid}", persistent=False)

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            kind = "version" if refuses_v5(conn, reason) else "refused"
            replies.put((kind, refusal(reason) or str(reason)))
        else:
            c.subscribe(reply_topic, qos=1)

    def on_subscribe(c: mqtt.Client, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
        if any(code.is_failure for code in codes):
            replies.put(("refused", f"subscribe to {reply_topic} refused ({codes[0]})"))
            return
        payload = dict(request)
        props = None
        if conn.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = rid.encode()
        else:
            payload["reply_to"] = reply_topic
        c.publish(topics.request, proto.encode(payload), qos=1, properties=props)
        replies.put(("sent", None))

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            replies.put(("reply", json.loads(msg.payload)))
        except ValueError:
            replies.put(("refused", f"unreadable reply on {msg.topic}"))

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    connect_async(client, conn, persistent=False)
    client.loop_start()
    sent = False
    try:
        while True:
            try:
                kind, value = replies.get(timeout=timeout)
            except queue.Empty:
                where = f"from {topics.request}" if sent else f"broker {conn.broker} not reached"
                raise AskTimeout(f"no reply within {timeout:g}s ({where}; is `edgellm serve` running "
                                 f"with --device-id {topics.device}?)") from None
            if kind == "version":
                raise VersionRefused(f"broker {conn.broker}: {value}")
            if kind == "refused":
                raise RequestError("refused", f"broker {conn.broker}: {value}")
            if kind == "sent":
                sent = True
                continue
            if value.get("status") == "error":
                error = value.get("error") or {}
                raise RequestError(str(error.get("code")), str(error.get("message")))
            yield value
            if value.get("done"):
                return
    finally:
        client.disconnect()
        client.loop_stop()


"""Test helpers for the MQTT service: a real mosquitto, a listening client, a running service.

Fixtures live in the test files; this module only has plain helpers they call.
"""
from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgellm.service import protocol as proto
from edgellm.service.broker import Mosquitto
from edgellm.service.connection import BrokerAddress, Connection, connect_async, make_client
from edgellm.service.server import Service, ServiceConfig
from engine_helpers import Hooked


def connection(url: str, **kw: Any) -> Connection:
    return Connection(broker=BrokerAddress.parse(url), **kw)


class Probe:
    """A device-side client: publishes requests and records every message it receives."""

    def __init__(self, conn: Connection, client_id: str = "probe", *, persistent: bool = False,
                 topics: tuple[str, ...] = ("#",)) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subscribed = threading.Event()
        self._topics = topics
        self.conn = conn
        self.client = make_client(conn, client_id, persistent=persistent)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        connect_async(self.client, conn, persistent=persistent, session_expiry=600)
        self.client.loop_start()
        assert self.subscribed.wait(10), "probe did not connect/subscribe"

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe([(t, 1) for t in self._topics])

    def publish(self, topic: str, payload: bytes | str | dict, *, response_topic: str | None = None,
                correlation: bytes | None = None, retain: bool = False) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = None
        if response_topic is not None or correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(5)

    def wait(self, match: Callable[[mqtt.MQTTMessage], bool], timeout: float = 10.0) -> mqtt.MQTTMessage:
        """The next message for which `match` is true; others are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                msg = self.messages.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"no matching message within {timeout}s") from None
            if match(msg):
                return msg

    def replies(self, rid: str, timeout: float = 10.0) -> list[dict]:
        """Reply payloads with `"id": rid` up to and including its final or error."""
        out = []
        while True:
            msg = self.wait(lambda m: is_reply(payload(m), rid), timeout)
            data = payload(msg)
            out.append(data)
            if data.get("done") or data.get("status") == "error":
                return out

    def drain(self, seconds: float) -> list[mqtt.MQTTMessage]:
        time.sleep(seconds)
        out = []
        while not self.messages.empty():
            out.append(self.messages.get())
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def is_reply(data: dict, rid: str) -> bool:
    """A reply to `rid`, not the request itself (a probe on '#' also sees requests)."""
    return data.get("id") == rid and bool({"seq", "done", "status"} & set(data))


def payload(msg: mqtt.MQTTMessage) -> dict:
    try:
        data = json.loads(msg.payload)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}



@contextmanager
def running_service(model: Any, conn: Connection, **config: Any) -> Iterator[Service]:
    """A started service, connected and subscribed, stopped on exit."""
    config.setdefault("device_id", "dev1")
    config.setdefault("reconnect_min_s", 0.2)
    config.setdefault("reconnect_max_s", 1.0)
    service = Service(model, conn, ServiceConfig(**config)).start()
    try:
        assert service.connected.wait(10), "service did not connect"
        time.sleep(0.1)  # SUBACK: the subscription is live before tests publish
        yield service
    finally:
        service.stop()


def held_for(conn: Connection, client_id: str, wait: float = 1.0) -> list[mqtt.MQTTMessage]:
    """What the broker still holds unacknowledged (or queued) for the persistent session
    `client_id`: a stand-in resumes the session, acknowledges nothing and records what it is handed."""
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    client = make_client(conn, client_id, persistent=True, manual_ack=True)
    client.on_message = lambda _c, _u, msg: got.put(msg)
    connect_async(client, conn, persistent=True, session_expiry=600)
    client.loop_start()
    time.sleep(wait)
    client.disconnect()
    client.loop_stop()
    return list(got.queue)


class Gated(Hooked):
    """A real model whose engine steps wait for `gate` first, so tests can hold the worker busy
    (with a request taken out of the queue); `started` is set once the first step is waiting."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.gate = threading.Event()
        self.started = threading.Event()

    def stepping(self) -> None:
        self.started.set()
        assert self.gate.wait(20), "test never opened the gate"


def make_password_file(workdir: Path, user: str, password: str) -> Path:
    path = workdir / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(path), user, password], check=True,
                   capture_output=True)
    return path


def make_tls_files(workdir: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    ca_key, ca_crt = workdir / "ca.key", workdir / "ca.crt"
    key, csr, crt, ext = workdir / "server.key", workdir / "server.csr", workdir / "server.crt", workdir / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*cmd: str) -> None:
        subprocess.run(["openssl", *cmd], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edgellm-test-ca",
        "-keyout", str(ca_key), "-out", str(ca_crt))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(crt))
    return {"ca": ca_crt, "cert": crt, "key": key}


def start_broker(workdir: Path, options: tuple[str, ...] = ()) -> Mosquitto:
    workdir.mkdir(parents=True, exist_ok=True)
    return Mosquitto(workdir, options=options).start()


# -- JSON Schema ------------------------------------------------------------

SCHEMAS = Path(proto.__file__).parent / "schemas"


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


_TYPES = {"string": str, "object": dict, "array": list, "boolean": bool, "null": type(None)}


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def schema_errors(value: Any, schema: dict, where: str = "$") -> list[str]:
    """The subset of JSON Schema 2020-12 our schema files use (jsonschema is not installed)."""
    errors: list[str] = []
    err = errors.append
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(value, n) for n in names):
            return [f"{where}: not of type {names}"]
    if "const" in schema and not _same(value, schema["const"]):
        err(f"{where}: not {schema['const']!r}")
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        err(f"{where}: not one of {schema['enum']}")
    for key in ("oneOf", "anyOf"):
        if key in schema:
            ok = sum(not schema_errors(value, s, where) for s in schema[key])
            if ok == 0 or (key == "oneOf" and ok > 1):
                err(f"{where}: {key} matched {ok}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 62):
            err(f"{where}: length out of range")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            err(f"{where}: does not match {schema['pattern']}")
    if _type_ok(value, "number"):
        if value < schema.get("minimum", -1e300) or value > schema.get("maximum", 1e300):
            err(f"{where}: {value} out of range")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            err(f"{where}: {value} <= {schema['exclusiveMinimum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 62):
            err(f"{where}: item count out of range")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, dict):
        errors += [f"{where}: missing {k}" for k in schema.get("required", []) if k not in value]
        if len(value) > schema.get("maxProperties", 1 << 62):
            err(f"{where}: too many properties")
        props = schema.get("properties", {})
        for k, v in value.items():
            if "propertyNames" in schema:
                errors += schema_errors(k, schema["propertyNames"], f"{where}.{k}(name)")
            if k in props:
                errors += schema_errors(v, props[k], f"{where}.{k}")
            elif schema.get("additionalProperties") is False:
                err(f"{where}: unexpected {k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(v, schema["additionalProperties"], f"{where}.{k}")
    return errors


def load_schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def check_status_lifecycle(conn: Callable[[], Connection], status_topic: str, proc: Any) -> dict:
    """The running `serve` process `proc` has a retained online status; once it is
    SIGKILLed, its Last Will turns that retained status offline. Returns the online payload."""
    watcher = Probe(conn(), "watcher", topics=(status_topic,))
    try:
        online = payload(watcher.wait(lambda m: payload(m).get("state") == "online", timeout=30))
        # retained: a device that subscribes later sees it too
        late = Probe(conn(), "late-1", topics=(status_topic,))
        assert payload(late.wait(lambda m: m.retain)) == online
        late.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert watcher.wait(lambda m: payload(m) == {"state": "offline"}, timeout=10)
        late = Probe(conn(), "late-2", topics=(status_topic,))
        assert payload(late.wait(lambda m: m.retain)) == {"state": "offline"}
        late.close()
        return online
    finally:
        watcher.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()

"""How to reach a broker: URL, credentials, TLS, protocol version -> a paho client.

Shared by `edgellm serve` and `edgellm ask` so both speak to the broker the same way.
"""
from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

MQTT_VERSIONS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
# amqtt, the Python broker, speaks only 3.1.1 and answers an MQTT 5 CONNECT with this reason.
UNSUPPORTED_VERSION = 132
# CONNACK reasons that retrying cannot fix: the operator must change the settings.
REFUSED_FOR_GOOD = {
    UNSUPPORTED_VERSION: "unsupported protocol version (a broker of MQTT 3.1.1 only? pass --mqtt-version 3.1.1)",
    134: "bad user name or password (check --username/--password-file)",
    135: "not authorized (check --username/--password-file)",
}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        """`mqtt://host[:1883]` or `mqtts://host[:8883]`; a bare `host[:port]` means mqtt://."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        if parts.username or parts.password:
            raise ValueError(f"broker URL {url!r}: pass credentials with --username/--password-file")
        if not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"broker URL {url!r}: expected mqtt[s]://host[:port]")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL {url!r}: bad port") from None
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Connection:
    """Everything needed to open an MQTT connection; `password` is read from a file, never argv."""

    broker: BrokerAddress
    mqtt_version: str = "5"
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive: int = 30

    @property
    def v5(self) -> bool:
        return self.mqtt_version == "5"

    @property
    def tls(self) -> bool:
        return self.broker.tls or self.tls_ca is not None


def read_password(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()[0]
    except (OSError, UnicodeDecodeError, IndexError) as exc:
        raise ValueError(f"--password-file {path}: cannot read a password ({exc})") from None


def make_client(conn: Connection, client_id: str, *, persistent: bool) -> mqtt.Client:
    """A paho v2-callback client; `persistent` keeps the broker-side session across reconnects."""
    if conn.mqtt_version not in MQTT_VERSIONS:
        raise ValueError(f"--mqtt-version {conn.mqtt_version!r} is not one of {sorted(MQTT_VERSIONS)}")
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTT_VERSIONS[conn.mqtt_version],
        clean_session=None if conn.v5 else not persistent,
    )
    if conn.username is not None:
        client.username_pw_set(conn.username, conn.password)
    client.on_socket_open = _no_delay
    if conn.tls:
        client.tls_set(
            ca_certs=conn.tls_ca,
            certfile=conn.tls_cert,
            keyfile=conn.tls_key,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    return client


def _no_delay(_client: mqtt.Client, _userdata: object, sock: socket.socket) -> None:
    """A request or reply often leaves right after a PUBACK; with Nagle's algorithm it would wait
    for the broker's delayed ACK (~40 ms on Linux), four times the latency budget of a request."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_async(client: mqtt.Client, conn: Connection, *, persistent: bool, session_expiry: int = 0) -> None:
    """Start connecting without blocking: `loop_start` then retries with backoff until it works."""
    properties = None
    clean_start: bool | int = mqtt.MQTT_CLEAN_START_FIRST_ONLY
    if conn.v5:
        clean_start = not persistent
    # Without the property the session expires at once (the MQTT 5 default). Leaving it out also
    # lets a 3.1.1-only broker (amqtt) read the CONNECT and refuse it; properties make it hang.
    if conn.v5 and persistent:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry
    client.connect_async(
        conn.broker.host,
        conn.broker.port,
        keepalive=conn.keepalive,
        clean_start=clean_start,
        properties=properties,
    )


def refusal(reason: object) -> str | None:
    """A one-line reason when a CONNACK refuses for good (credentials, authorization, protocol version)."""
    value = getattr(reason, "value", None)
    return REFUSED_FOR_GOOD.get(value) if isinstance(value, int) else None


def publish_properties(correlation: bytes | None) -> Properties | None:
    if correlation is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    return props

"""How to reach a broker: URL, credentials, TLS, protocol version -> a paho client.

Shared by `edgellm serve` and `edgellm ask` so both speak to the broker the same way.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from .bounded import BoundedClient

log = logging.getLogger("edgellm.service")

MQTT_VERSIONS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
# amqtt, the Python broker, speaks only 3.1.1 and answers an MQTT 5 CONNECT with this reason.
UNSUPPORTED_VERSION = 132
# CONNACK reasons that retrying cannot fix: the operator must change the settings.
REFUSED_FOR_GOOD = {
    UNSUPPORTED_VERSION: "unsupported protocol version (a broker of MQTT 3.1.1 only? pass --mqtt-version 3.1.1)",
    134: "bad user name or password (check --username/--password-file)",
    135: "not authorized (check --username/--password-file)",
}
# What to do about a certificate the client refused, by OpenSSL's X509_V_ERR code.
_CERT_HINTS = {
    9: "check this device's clock",  # not yet valid: a board without a clock before NTP
    10: "check this device's clock, or renew the broker's certificate",  # expired
    18: "pass the broker's CA with --tls-ca", 19: "pass the broker's CA with --tls-ca",
    20: "pass the broker's CA with --tls-ca", 21: "pass the broker's CA with --tls-ca",
    62: "connect by a host name the certificate lists", 64: "connect by an address the certificate lists",
}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        """`mqtt://host[:1883]` or `mqtts://host[:8883]`; a bare `host[:port]` means mqtt://.

        Messages show the URL with any user:password replaced: error lines end up in logs.
        """
        shown = redact(url)
        if "@" in url:  # before parsing: an unescaped `/` in a password would hide it in the path
            raise ValueError(f"broker URL {shown!r}: pass credentials with --username/--password-file")
        try:
            parts = urlsplit(url if "://" in url else f"mqtt://{url}")
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL {shown!r}: bad host or port") from None
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL {shown!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"broker URL {shown!r}: expected mqtt[s]://host[:port]")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def redact(url: str) -> str:
    """`url` with everything before its last `@` (user, password, even an unescaped `/` or `@` in
    the password) shown as `***`."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, sep, _ = head.partition("://")
    return f"{scheme}{sep}***@{tail}" if sep else f"***@{tail}"


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


class Client(BoundedClient):
    """paho's client, keeping why its last connection attempt failed: paho calls `on_connect_fail`
    with no exception, so a refused certificate would read like an unreachable host."""

    connect_error: OSError | None = None
    tls = False

    def reconnect(self) -> mqtt.MQTTErrorCode:
        try:
            result = super().reconnect()
        except OSError as exc:  # ssl.SSLError and socket errors alike
            self.connect_error = exc
            raise
        self.connect_error = None
        return result


def connect_failure_reason(client: mqtt.Client) -> str:
    """One line on why `client`'s last connection attempt failed, for `on_connect_fail`."""
    exc = getattr(client, "connect_error", None)
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = _CERT_HINTS.get(exc.verify_code, "check --tls-ca and the broker's certificate")
        return f"TLS certificate refused: {exc.verify_message or exc.reason} ({hint})"
    not_tls = "does this port speak TLS? mqtts:// and --tls-ca imply it"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc} ({not_tls})"
    if isinstance(exc, ConnectionResetError) and getattr(client, "tls", False):
        # mosquitto drops a ClientHello on a plain listener as a malformed packet
        return f"TLS handshake failed: connection reset by the broker ({not_tls})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running on this port?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if exc is not None:
        return exc.strerror or str(exc) or type(exc).__name__
    return "no reason recorded"


def make_client(conn: Connection, client_id: str, *, persistent: bool, max_packet: int | None = None,
                manual_ack: bool = False) -> Client:
    """A paho v2-callback client; `persistent` keeps the broker-side session across reconnects,
    `max_packet` bounds the memory one incoming message may take (see `bounded`), `manual_ack`
    leaves acknowledging QoS 1 messages to the caller (see `acks`)."""
    if conn.mqtt_version not in MQTT_VERSIONS:
        raise ValueError(f"--mqtt-version {conn.mqtt_version!r} is not one of {sorted(MQTT_VERSIONS)}")
    client = Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTT_VERSIONS[conn.mqtt_version],
        clean_session=None if conn.v5 else not persistent,
        max_packet=max_packet,
        manual_ack=manual_ack,
    )
    if conn.username is not None:
        client.username_pw_set(conn.username, conn.password)
    client.on_socket_open = _no_delay
    if conn.tls:
        client.tls = True
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


def connect_async(client: mqtt.Client, conn: Connection, *, persistent: bool, session_expiry: int = 0,
                  receive_maximum: int | None = None) -> None:
    """Start connecting without blocking: `loop_start` then retries with backoff until it works.

    On MQTT 5, `receive_maximum` is advertised as Receive Maximum: how many QoS 1 messages the
    broker may hand us before we acknowledge any. No Maximum Packet Size is ever advertised: a
    broker drops a larger message without telling its sender, so a request would go unanswered;
    `bounded` reads any size in bounded memory instead."""
    properties = None
    clean_start: bool | int = mqtt.MQTT_CLEAN_START_FIRST_ONLY
    if conn.v5:
        clean_start = not persistent
    # Without the property the session expires at once (the MQTT 5 default). Leaving it out also
    # lets a 3.1.1-only broker (amqtt) read the CONNECT and refuse it; properties make it hang.
    if conn.v5 and persistent:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry
        if receive_maximum is not None:
            properties.ReceiveMaximum = receive_maximum
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


def refuses_v5(conn: Connection, reason: object) -> bool:
    """Whether a CONNACK `reason` is a broker refusing MQTT 5 (amqtt speaks only 3.1.1), which
    asking again over 3.1.1 fixes."""
    return conn.v5 and getattr(reason, "value", None) == UNSUPPORTED_VERSION


def over_311(conn: Connection) -> Connection:
    """`conn` over MQTT 3.1.1 after `refuses_v5`, said in one log line so a user sees why."""
    log.warning("broker %s refuses MQTT 5 (unsupported protocol version); going on over MQTT 3.1.1", conn.broker)
    return dataclasses.replace(conn, mqtt_version="3.1.1")


def publish_properties(correlation: bytes | None) -> Properties | None:
    if correlation is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    return props


def parse_address(text: str, flag: str = "--http") -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, :PORT or PORT (host 127.0.0.1) -> (host, port), for the fronts that
    listen (HTTP, Wyoming); `flag` names the option in the error."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} {text!r}: expected HOST:PORT with a port in 0-65535")
    return host, int(port)

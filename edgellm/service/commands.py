"""`edgellm serve` and `edgellm ask`: arguments and entry points the CLI wires in.

Settings come from the command line, else from the `[serve]` table of `--config`
(keys are the long option names), else from the defaults of `Connection` and
`ServiceConfig`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import signal
import socket
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

from ..cli import add_load_arguments, add_sampling_arguments, load_model, sampling_params
from ..errors import RequestError
from . import protocol as proto
from .broker import BrokerError, Mosquitto, port_is_free
from .client import ask, new_request_id
from .connection import MQTT_VERSIONS, BrokerAddress, Connection, read_password
from .server import Service, ServiceConfig

log = logging.getLogger("edgellm.service")

# Options a `[serve]` table may set, by argparse dest.
_CONFIG_KEYS = (
    "broker", "device_id", "topic_prefix", "client_id", "username", "password_file", "tls_ca", "tls_cert",
    "tls_key", "mqtt_version", "shared_group", "queue_size", "session_expiry", "max_payload",
)
_INT_KEYS = ("queue_size", "session_expiry", "max_payload")


def _default_device_id() -> str:
    """The host name, reduced to characters that are safe in one topic level."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "edge"


def _add_connection_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    g.add_argument("--broker", help="mqtt://host[:1883] or mqtts://host[:8883]")
    g.add_argument("--device-id", help="this device's topic level (default: host name)")
    g.add_argument("--topic-prefix", help="first topic level (default: edgellm)")
    g.add_argument("--username")
    g.add_argument("--password-file", help="file whose first line is the password (kept off the command line)")
    g.add_argument("--tls-ca", help="CA certificate to verify the broker (implies TLS)")
    g.add_argument("--tls-cert", help="client certificate, for brokers that require one")
    g.add_argument("--tls-key", help="client certificate's private key")
    g.add_argument("--mqtt-version", choices=sorted(MQTT_VERSIONS), help="default: 5")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_load_arguments(p)
    _add_connection_arguments(p)
    p.add_argument("--config", type=Path, help="TOML file with a [serve] table of these options")
    g = p.add_argument_group("service")
    g.add_argument("--client-id", help="MQTT client id (default: edgellm-DEVICE; keep it stable to keep the session)")
    g.add_argument("--shared-group", help="share requests with other services via $share/NAME/...")
    g.add_argument("--queue-size", type=int, help="requests that may wait; more are answered 'busy' (default: 8)")
    g.add_argument("--session-expiry", type=int,
                   help="seconds the broker keeps requests for us while offline (default: 3600)")
    g.add_argument("--max-payload", type=int, help="largest request in bytes (default: 65536)")


def add_ask_arguments(p: argparse.ArgumentParser) -> None:
    _add_connection_arguments(p)
    p.add_argument("prompt")
    add_sampling_arguments(p)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply (default: 120)")
    p.add_argument("--json", action="store_true", help="print every reply payload as one JSON line")


def _apply_config(args: argparse.Namespace) -> None:
    """Fill options left unset on the command line from the `[serve]` table of --config."""
    path = getattr(args, "config", None)
    if path is None:
        return
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("serve", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--config {path}: {exc}") from None
    if not isinstance(table, dict):
        raise ValueError(f"--config {path}: [serve] must be a table")
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in _CONFIG_KEYS:
            raise ValueError(f"--config {path}: unknown key serve.{key}")
        if dest == "mqtt_version":
            value = str(value)
        wanted = int if dest in _INT_KEYS else str
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise ValueError(f"--config {path}: serve.{key} must be {'an integer' if wanted is int else 'a string'}")
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)


def _connection(args: argparse.Namespace, broker: str) -> Connection:
    password = read_password(args.password_file) if args.password_file else None
    return Connection(
        broker=BrokerAddress.parse(broker),
        mqtt_version=args.mqtt_version or "5",
        username=args.username,
        password=password,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def _topics(args: argparse.Namespace) -> proto.Topics:
    return proto.Topics(args.topic_prefix or "edgellm", args.device_id or _default_device_id())


def _service_config(args: argparse.Namespace, topics: proto.Topics) -> ServiceConfig:
    given = {k: getattr(args, k) for k in ("client_id", "shared_group", "queue_size", "session_expiry", "max_payload")}
    for key, low in (("queue_size", 1), ("max_payload", 1), ("session_expiry", 0)):
        if given[key] is not None and given[key] < low:
            raise ValueError(f"--{key.replace('_', '-')} must be at least {low}, got {given[key]}")
    return ServiceConfig(device_id=topics.device, topic_prefix=topics.prefix,
                         **{k: v for k, v in given.items() if v is not None})


def _embedded_broker() -> Mosquitto:
    """1883 when free, so `edgellm ask` finds it without --broker; else any free port."""
    broker = Mosquitto(port=1883 if port_is_free(1883) else 0)
    broker.start()
    log.warning("no --broker given: started an embedded mosquitto at %s (this host only)", broker.url)
    return broker


def run_serve(args: argparse.Namespace) -> int:
    _apply_config(args)
    topics = _topics(args)
    config = _service_config(args, topics)
    conn = _connection(args, args.broker or "mqtt://127.0.0.1")  # bad settings fail before the slow load
    model = load_model(args)
    broker = None
    if args.broker is None:
        try:
            broker = _embedded_broker()
        except BrokerError as exc:
            log.error("%s", exc)
            return 1
        conn = dataclasses.replace(conn, broker=BrokerAddress.parse(broker.url))
    service = Service(model, conn, config)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        service.start()
        log.info("serving %s as device %r: requests on %s", model.manifest.name or args.bundle,
                 topics.device, topics.request)
        while not stop.is_set() and not service.finished.is_set():
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.stop()
        if broker is not None:
            broker.close()
    return 1 if service.failure else 0


def run_ask(args: argparse.Namespace) -> int:
    prompt = args.prompt
    request: dict[str, Any] = {"id": new_request_id(), "stream": True}
    if args.raw:
        request["prompt"] = prompt
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        request["messages"] = [*system, {"role": "user", "content": prompt}]
    for key, value in sampling_params(args).items():
        request["max_tokens" if key == "max_new_tokens" else key] = value
    conn = _connection(args, args.broker or "mqtt://127.0.0.1:1883")
    try:
        for reply in ask(conn, _topics(args), request, args.timeout):
            if args.json:
                print(proto.encode(reply).decode())
            elif reply.get("done"):
                sys.stdout.write("\n")
                print(f"[{reply['finish_reason']}] {reply.get('usage', {})}", file=sys.stderr)
            else:
                sys.stdout.write(reply.get("delta", ""))
                sys.stdout.flush()
    except RequestError as exc:
        print(f"edgellm ask: error: {exc.code}: {exc}", file=sys.stderr)
        return 1
    return 0

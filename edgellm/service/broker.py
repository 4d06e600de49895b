"""The embedded broker, so `edgellm serve` and `edgellm demo` work with no setup.

A private mosquitto on 127.0.0.1 when one is installed, else amqtt in this process
(`amqtt_broker`, the `broker` extra). The same Mosquitto class runs the brokers of the
test suite (with password files or TLS added through `options`), so tests exercise
exactly what users run.
"""
from __future__ import annotations

import getpass
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Protocol, Sequence

from ..errors import EdgeLLMError

log = logging.getLogger("edgellm.service")

INSTALL_HINT = (
    "no MQTT broker available: install mosquitto (Debian/Ubuntu/Raspberry Pi OS: "
    "`sudo apt-get install mosquitto`; macOS: `brew install mosquitto`) or pass --broker mqtt://HOST:1883"
)
AMQTT_HINT = '`pip install "edgellm[broker]"`'
# Forces the embedded broker's kind; unset: mosquitto when found, else the Python one.
BROKER_ENV = "EDGELLM_BROKER"
MOSQUITTO, PYTHON = "mosquitto", "python"
# What each kind speaks: amqtt refuses MQTT 5 CONNECTs.
MQTT_VERSIONS_OF = {MOSQUITTO: ("5", "3.1.1"), PYTHON: ("3.1.1",)}
# Debian installs mosquitto in /usr/sbin, which is not on an ordinary user's PATH.
_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")


class BrokerError(EdgeLLMError):
    """The embedded broker cannot be found or does not start."""


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or shutil.which("mosquitto", path=os.pathsep.join(_SEARCH))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedBroker(Protocol):
    kind: str

    @property
    def url(self) -> str: ...

    def close(self) -> None: ...


def embedded_kind() -> str:
    """Which embedded broker `start_embedded` will run; cheap, so it is checked before a slow model load."""
    forced = os.environ.get(BROKER_ENV, "").strip().lower()
    if forced not in ("", MOSQUITTO, PYTHON):
        raise BrokerError(f"{BROKER_ENV}={forced!r}: expected {MOSQUITTO} or {PYTHON}")
    if forced == MOSQUITTO or (not forced and find_mosquitto() is not None):
        if find_mosquitto() is None:
            raise BrokerError(f"{BROKER_ENV}={MOSQUITTO}: {INSTALL_HINT}")
        return MOSQUITTO
    if importlib.util.find_spec("amqtt") is None:
        where = f"{BROKER_ENV}={PYTHON}: amqtt is not installed" if forced else INSTALL_HINT
        raise BrokerError(f"{where} ({AMQTT_HINT} for an in-process Python broker)")
    return PYTHON


def start_embedded(kind: str, port: int = 0, workdir: str | os.PathLike[str] | None = None) -> EmbeddedBroker:
    """A started broker of `kind` on 127.0.0.1:`port` (0: a free one); `workdir` only for mosquitto."""
    if kind == PYTHON:
        from .amqtt_broker import PythonBroker  # the optional extra, imported only when used

        return PythonBroker(port).start()
    return Mosquitto(workdir, port).start()


class Mosquitto:
    """A mosquitto process listening on 127.0.0.1:`port` (0 picks a free one), data in `workdir`.

    Persistence is on, so sessions and queued QoS 1 messages survive `stop()`/`start()`
    exactly as they survive a restart of a real broker.
    """

    kind = MOSQUITTO

    def __init__(self, workdir: str | os.PathLike[str] | None = None, port: int = 0,
                 options: Sequence[str] = ()) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise BrokerError(INSTALL_HINT)
        self.exe = exe
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="edgellm-mosquitto-")
        self.workdir = Path(workdir or self._tmp.name)
        self.port = port or free_port()
        self._fixed_port = bool(port)
        self.options = list(options)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def _write_config(self) -> Path:
        config = self.workdir / "mosquitto.conf"
        lines = [
            # Run as whoever we are: as root, mosquitto would otherwise switch to
            # user "mosquitto" and could not write its database here.
            f"user {getpass.getuser()}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"listener {self.port} 127.0.0.1",
            # Forwarded requests and replies often follow a PUBACK on the same socket: without
            # this, Nagle's algorithm holds them for the client's delayed ACK (~40 ms).
            "set_tcp_nodelay true",
            *self.options,
        ]
        if not any(line.startswith(("allow_anonymous", "password_file")) for line in self.options):
            lines.append("allow_anonymous true")
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        for _ in range(3):
            config = self._write_config()
            with open(self.log_path, "ab") as logfile:
                self.process = subprocess.Popen(
                    [self.exe, "-c", str(config)], stdout=logfile, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_ready(timeout):
                self._fixed_port = True  # a restart must come back where clients reconnect
                log.info("broker: mosquitto %s (pid %d)", self.url, self.process.pid)
                return self
            tail = self.log_tail()
            if "Address already in use" in tail and not self._fixed_port:
                self.port = free_port()  # another process took the port we picked; pick again
                continue
            self.stop()
            raise BrokerError(f"mosquitto did not start on port {self.port}: {tail.strip().splitlines()[-1:]}")
        raise BrokerError(f"mosquitto found no free port after 3 tries ({self.log_path})")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, so mosquitto saves its sessions before it exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

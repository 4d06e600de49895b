"""The embedded broker, so `edgellm serve` and `edgellm demo` work with no setup.

A private mosquitto on 127.0.0.1 when one is installed, else amqtt in this process
(`amqtt_broker`, the `broker` extra). The same Mosquitto class runs the brokers of the
test suite (with password files or TLS added through `options`), so tests exercise
exactly what users run.

A mosquitto must not outlive the process that started it: it would hold port 1883, and the
next `edgellm serve` would move to another port where `edgellm ask` never looks. On Linux it
dies with its parent (even one killed by SIGKILL); elsewhere, and for one left by an older
version, the next start stops it, once its pid file and command line prove it is ours.
"""
from __future__ import annotations

import ctypes
import getpass
import importlib.util
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ..errors import BrokerError
from ..runtime.ownership import cmdline, mark, owner_gone, pid_running

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
# In each embedded mosquitto's directory: who started it, and the mosquitto's own pid.
OWNER, PID_FILE = "owner.json", "mosquitto.pid"
_PR_SET_PDEATHSIG = 1


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or shutil.which("mosquitto", path=os.pathsep.join(_SEARCH))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a broker could listen on `port`: like mosquitto and asyncio, ignore TIME_WAIT
    connections, which a broker stopped a moment ago leaves behind."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    """A started broker of `kind` on 127.0.0.1:`port` when free, else on any free port (0: any).

    A mosquitto a killed edgellm process left is stopped first, so `port` comes back to us;
    `workdir` only for mosquitto (default: a fresh directory under `runtime_dir()`).
    """
    if kind == MOSQUITTO:
        reap_stale()
    if port and not port_is_free(port):
        log.warning("port %d on 127.0.0.1 is taken (another broker?): the embedded broker takes a free port "
                    "instead; pass its URL to clients with --broker", port)
        port = 0
    if kind == PYTHON:
        return _python_broker(port)
    return Mosquitto(workdir, port).start()


def _python_broker(port: int) -> EmbeddedBroker:
    """amqtt on `port`, or with 0 on a port picked here, picked again should another process take
    it before amqtt binds it (Mosquitto.start does the same for mosquitto)."""
    from .amqtt_broker import PythonBroker  # the optional extra, imported only when used

    for _ in range(3):
        try:
            return PythonBroker(port or free_port()).start()
        except BrokerError as exc:
            if port or "address already in use" not in str(exc).lower():
                raise
    raise BrokerError("amqtt found no free port after 3 tries")


def runtime_dir() -> Path:
    """This user's directory of embedded brokers: a known place, so a later start finds what a
    killed one left. Refused unless private to this user (it is in a shared /tmp)."""
    base = Path(tempfile.gettempdir()) / f"edgellm-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        info = base.lstat()
    except OSError as exc:
        raise BrokerError(f"{base}: cannot create the embedded broker's directory ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise BrokerError(f"{base}: not a directory private to this user (uid {info.st_uid}, mode "
                          f"{stat.filemode(info.st_mode)}); remove it and start again")
    return base


def reap_stale() -> None:
    """Stop each embedded mosquitto whose starter no longer runs, and remove its directory.

    A process is stopped only when its pid file and its command line (our config file in that
    directory) prove it is that mosquitto; where /proc cannot prove it (macOS), it is left.
    """
    for workdir in sorted(runtime_dir().glob("mosquitto-*")):
        if not owner_gone(workdir / OWNER):
            continue
        if _stop_orphan(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
            log.warning("removed the embedded broker a killed edgellm process left in %s", workdir)


def _stop_orphan(workdir: Path) -> bool:
    """Stop the mosquitto recorded in `workdir` if it still runs; False when it cannot be proven ours."""
    try:
        pid = int((workdir / PID_FILE).read_text())
    except (OSError, ValueError):
        return True  # never started, or a pid file never written: nothing of ours to stop
    if not _is_ours(pid, workdir):
        if cmdline(pid) is None and pid_running(pid):
            log.warning("pid %d may be the embedded mosquitto of a killed edgellm (%s), but this system "
                        "cannot show its command line: stop it yourself to free its port", pid, workdir)
            return False
        return True  # exited, or the pid now belongs to another program
    os.kill(pid, signal.SIGTERM)  # mosquitto saves its sessions, then exits
    deadline = time.monotonic() + 5
    while _is_ours(pid, workdir):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)
    log.warning("stopped mosquitto pid %d, left running by a killed edgellm process", pid)
    return True


def _is_ours(pid: int, workdir: Path) -> bool:
    args = cmdline(pid)
    return (bool(args) and Path(args[0]).name == "mosquitto" and pid_running(pid)
            and args[1:] == ["-c", str(workdir / "mosquitto.conf")])


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has Linux send the child SIGTERM when this thread's process dies, even
    by SIGKILL; None where there is no prctl (macOS: `reap_stale` cleans up at the next start)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class Mosquitto:
    """A mosquitto process listening on 127.0.0.1:`port` (0 picks a free one), data in `workdir`.

    Persistence is on, so sessions and queued QoS 1 messages survive `stop()`/`start()`
    exactly as they survive a restart of a real broker. Without `workdir`, a fresh directory
    under `runtime_dir()` marked with our pid, removed by `close()` or by a later `reap_stale()`.
    Linux stops the process when the *thread* that called `start()` ends: call it from the
    thread that lives as long as the broker should (the main thread, in edgellm).
    """

    def __init__(self, workdir: str | os.PathLike[str] | None = None, port: int = 0,
                 options: Sequence[str] = ()) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise BrokerError(INSTALL_HINT)
        self.exe = exe
        self._own_dir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="mosquitto-", dir=runtime_dir())
            mark(Path(workdir) / OWNER)
        self.workdir = Path(workdir)
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
                # Its own session: a Ctrl-C meant for the service must not stop the broker
                # before the service has said offline and handed back its replies.
                self.process = subprocess.Popen(
                    [self.exe, "-c", str(config)], stdout=logfile, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent(),
                )
            (self.workdir / PID_FILE).write_text(f"{self.process.pid}\n")
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
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

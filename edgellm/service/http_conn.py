"""The HTTP front's connections: accepted here, not by asyncio's server, so that their number
stays under a limit, each request must arrive within a deadline, and running out of file
descriptors costs one log line instead of a storm.

Why not asyncio's `create_server` with uvicorn's own limits: on EMFILE its accept loop logs a
traceback and schedules a retry for every slot of the backlog (uvicorn asks for 2048), each
retry doing the same again (627,852 tracebacks, 264 MB, in 40 s). uvicorn's
`limit_concurrency` answers 503 only once a whole request has arrived, and logs each one; and
nothing times out a request that never finishes arriving (h11 arms its keep-alive timer only
after a response, and any byte disarms it). So `Listener` accepts, counts connections (in all
and per client address), answers those over the limit 503 at once, and wraps uvicorn's h11
protocol in `_Connection`, which closes a connection whose request (headers and body) is not
all there `read_timeout` seconds after it began. Accepted sockets get TCP_NODELAY: asyncio sets
it only on sockets made with proto IPPROTO_TCP, and without it every keep-alive request after
the first waited ~44 ms for a delayed ACK.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import h11

from .http_metrics import Metrics

log = logging.getLogger("edgellm.service")

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_READ_TIMEOUT = 20.0  # seconds for a request's headers and body: a 1 MiB body over a slow link
RESERVED_FDS = 32  # descriptors kept for the rest of the process (MQTT, logs, the refusals' own sockets)
_OUT_OF = (errno.EMFILE, errno.ENFILE)
_ACCEPT_BATCH = 64  # connections accepted per wake-up, so the loop still serves the others
_RETRY_S = 1.0  # after running out of descriptors, accepting resumes this much later


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                 "code": "too_many_connections"}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


def descriptor_room() -> int:
    """How many more descriptors this process may open, less the reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: count as if a few hundred were taken
        used = 256
    return soft - used - RESERVED_FDS


@dataclass(frozen=True)
class Limits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    read_timeout: float = DEFAULT_READ_TIMEOUT

    @property
    def per_client(self) -> int:
        """Connections one address may hold: a quarter, so one client cannot take them all."""
        return max(1, self.max_connections // 4)


class Episodes:
    """One log line per episode of a repeated event: the first occurrence is logged, the rest
    only counted (in /metrics) until `quiet` seconds pass without one."""

    def __init__(self, quiet: float = 60.0) -> None:
        self.quiet = quiet
        self._last: dict[str, float] = {}

    def note(self, kind: str, message: str) -> None:
        now = time.monotonic()
        last, self._last[kind] = self._last.get(kind), now
        if last is None or now - last > self.quiet:
            log.warning("%s (logged once: more are counted in /metrics until %.0f s pass without one)",
                        message, self.quiet)


class _Connection(asyncio.Protocol):
    """uvicorn's h11 protocol for one connection, with a deadline on each request's arrival:
    from the connection's start, or from the first byte of a request after the previous
    response, to the end of its body. While a response is on its way the deadline waits (a
    request pipelined behind it is not read yet)."""

    def __init__(self, inner: Any, listener: "Listener", client: str) -> None:
        self.inner = inner
        self.listener = listener
        self.client = client
        self.transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None:
            self._arm()
        self.inner.data_received(data)
        conn = self.inner.conn
        if conn.their_state not in (h11.IDLE, h11.SEND_BODY) and not conn.trailing_data[0]:
            self._disarm()  # the request is all here, nothing after it (or the connection is done with)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.inner.connection_lost(exc)
        self.listener.closed(self.client)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.listener.limits.read_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.inner.conn.their_state is h11.DONE:
            self._arm()  # answering a request that arrived; the one pipelined behind it is timed once read
            return
        if self.transport is not None and not self.transport.is_closing():
            self.listener.refused("slow", f"closed a connection from {self.client}: its request did not arrive "
                                          f"within {self.listener.limits.read_timeout:g} s (--http-read-timeout)")
            self.transport.abort()  # nothing of ours to flush: its request never arrived


class Listener:
    """Accepts connections on a listening socket within `limits`, on the event loop of `start`."""

    def __init__(self, sock: socket.socket, limits: Limits, metrics: Metrics) -> None:
        self.sock = sock
        self.limits = limits
        self.metrics = metrics
        self.episodes = Episodes()
        self.clients: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._protocol: Callable[[], Any] | None = None

    @property
    def open(self) -> int:
        return self.clients.total()

    def start(self, loop: asyncio.AbstractEventLoop, protocol: Callable[[], Any]) -> None:
        """Accept on `loop`; `protocol()` makes uvicorn's protocol for each connection."""
        self._loop, self._protocol = loop, protocol
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._accept)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None

    def refused(self, reason: str, message: str) -> None:
        self.metrics.refused(reason)
        self.episodes.note(reason, message)

    def closed(self, client: str) -> None:
        self.clients[client] -= 1
        if self.clients[client] <= 0:
            del self.clients[client]
        self.metrics.connections = self.open

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors, or memory: a pause, not a spin
                if self._loop is None:
                    return
                self.refused("descriptors" if exc.errno in _OUT_OF else "accept",
                             f"HTTP: cannot accept connections ({exc.strerror or exc}) with {self.open} open; "
                             f"trying again every {_RETRY_S:g} s")
                self._loop.remove_reader(self.sock.fileno())
                self._loop.call_later(_RETRY_S, self._resume)
                return
            self._admit(conn, address[0] if isinstance(address, tuple) else str(address))

    def _resume(self) -> None:
        if self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def _admit(self, conn: socket.socket, client: str) -> None:
        limits = self.limits
        if self.open >= limits.max_connections:
            why = f"{self.open} connections are open, the limit (--http-max-connections)"
        elif self.clients[client] >= limits.per_client:
            why = f"{client} holds {self.clients[client]} connections, the most one address may"
        else:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.clients[client] += 1
            self.metrics.connections = self.open
            assert self._loop is not None and self._protocol is not None
            inner = self._protocol()
            self._loop.create_task(self._loop.connect_accepted_socket(lambda: _Connection(inner, self, client),
                                                                      conn))
            return
        self.refused("connections", f"HTTP: refusing connections with 503: {why}")
        try:
            conn.setblocking(False)
            conn.recv(65536)  # what already came: closing with it unread would reset the connection, 503 unread
        except OSError:
            pass
        try:
            conn.send(_refusal(f"too many connections: {why}; try again later"))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()

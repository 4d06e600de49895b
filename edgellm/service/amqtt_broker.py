"""The fallback embedded broker: amqtt (pure Python) in a background thread of this process.

Only imported when no mosquitto is found (or EDGELLM_BROKER=python), so amqtt stays an
optional extra: `pip install "edgellm[broker]"`. amqtt speaks MQTT 3.1.1 only and has no
shared subscriptions; docs/mqtt.md lists what that changes for the service.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from ..errors import BrokerError

log = logging.getLogger("edgellm.service")


class LocalClients(BaseAuthPlugin):
    """Admits every client without marking it anonymous.

    amqtt drops the session of an "anonymous" client as soon as it disconnects, which would
    lose the service's persistent session; the listener is bound to 127.0.0.1, so every
    client is a local process anyway.
    """

    async def authenticate(self, *, session: Session) -> bool:
        return True


class PythonBroker:
    """amqtt listening on 127.0.0.1:`port`; sessions live in memory. broker.start_embedded picks
    the port and picks again when another process took it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Broker | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _config(self) -> dict:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            # Only our admission plugin: amqtt's defaults add $SYS topics and packet logging.
            "plugins": {f"{LocalClients.__module__}.{LocalClients.__qualname__}": {}},
        }

    def start(self, timeout: float = 10.0) -> "PythonBroker":
        # amqtt (and its state machine library) log every connection at INFO; keep the
        # service's log readable unless the user configured those loggers.
        for name in ("amqtt", "transitions"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self._start(timeout)
        log.info("broker: amqtt (in-process) %s", self.url)
        return self

    def _start(self, timeout: float) -> None:
        started: Future[None] = Future()
        loop = asyncio.new_event_loop()

        async def boot() -> None:
            self._broker = Broker(self._config(), loop=loop)
            await self._broker.start()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(boot())
            except Exception as exc:  # noqa: BLE001 - handed to the starting thread
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="edgellm-amqtt", daemon=True)
        self._thread.start()
        try:
            started.result(timeout)
        except Exception as exc:  # noqa: BLE001 - amqtt wraps OSError in its own BrokerError
            self._thread.join(1)
            self._loop = self._broker = self._thread = None
            cause = exc.__cause__ or exc
            raise BrokerError(f"amqtt did not start on 127.0.0.1:{self.port}: {cause}") from None

    def stop(self, timeout: float = 5.0) -> None:
        """Closes every session and the listener, then ends the broker's thread."""
        if self._loop is None or self._thread is None:
            return
        if self._broker is not None:
            done = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            try:
                done.result(timeout)
            except Exception:  # noqa: BLE001 - stopping must not fail the caller
                log.warning("amqtt did not shut down cleanly", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop = self._broker = self._thread = None

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> "PythonBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The Wyoming front: the language stage of a Home Assistant Assist voice pipeline.

Wyoming (PyPI `wyoming`, Home Assistant's own library) is JSON header lines over TCP; this front
speaks its `handle` domain: `describe` -> `info`; `transcript` -> `handled-start`, one
`handled-chunk` per sentence (the MQTT stream's `SentenceSplitter`, so the text-to-speech stage
starts on the first sentence), `handled-stop`, then `handled` with the whole answer for clients
that predate streaming (those read until `handled` and skip the rest; streaming ones stop at
`handled-stop`); `not-handled` with the reason on any error. A conversation is kept per Wyoming
`context` (`{"conversation_id": ...}` handed back with each answer): the next turn resends the
earlier ones, whose cached rows the engine reuses within the conversation's tenant.

Like every front it only translates: one `engine.Job` per transcript, on the same engine and
queue as MQTT and HTTP. Each event's header, data and payload are bounded before they are read.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from wyoming.event import async_write_event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled
from wyoming.info import Attribution, HandleModel, HandleProgram, Info

from .. import __version__
from ..engine import Engine, Job, Outcome
from ..errors import GenerationError
from ..messages import check_messages
from .protocol import SentenceSplitter

log = logging.getLogger("edgellm.service.wyoming")

MAX_HEADER = 16 * 1024  # one JSON header line
MAX_DATA = 64 * 1024  # an event's data (a transcript and its context)
MAX_PAYLOAD = 0  # the handle domain carries no audio: a payload is refused
DEFAULT_SYSTEM = ("You are a voice assistant in a home. Answer in one or two short sentences that read well "
                  "aloud: no lists, no markdown, no emoji.")


@dataclass(frozen=True)
class WyomingConfig:
    host: str = "127.0.0.1"
    port: int = 10400  # the port Home Assistant's Wyoming integration suggests for handle services
    system: str = DEFAULT_SYSTEM
    languages: tuple[str, ...] = ("en",)
    max_tokens: int = 256
    conversations: int = 64  # kept for follow-ups; the least recently used goes first
    turns: int = 8  # messages of a conversation resent with each transcript (user + assistant)
    zeroconf: bool = True  # announce `_wyoming._tcp` when `zeroconf` is installed and the host is not loopback
    max_connections: int = 16  # a voice pipeline holds one or two; more are closed at once


class ProtocolError(Exception):
    """A client broke the framing or a bound: its connection is closed, nobody else is affected."""


async def read_event(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """One event as {"type", "data"}; None at end of stream. Each length is checked before reading."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise ProtocolError("connection closed inside an event header") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"event header over {MAX_HEADER} bytes") from None
    try:
        header = json.loads(line)
    except ValueError:
        raise ProtocolError("event header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("event header must be a JSON object with a string 'type'")
    data = header.get("data") or {}
    lengths = {name: header.get(name) or 0 for name in ("data_length", "payload_length")}
    for name, limit in (("data_length", MAX_DATA), ("payload_length", MAX_PAYLOAD)):
        value = lengths[name]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
            raise ProtocolError(f"{name} {value!r} is not within 0..{limit}")
    if lengths["data_length"]:
        try:
            extra = json.loads(await reader.readexactly(lengths["data_length"]))
        except (asyncio.IncompleteReadError, ValueError):
            raise ProtocolError("event data is cut short or not JSON") from None
        if not isinstance(extra, dict) or not isinstance(data, dict):
            raise ProtocolError("event data must be a JSON object")
        data = {**data, **extra}
    if not isinstance(data, dict):
        raise ProtocolError("event data must be a JSON object")
    return {"type": header["type"], "data": data}


class Conversations:
    """Each conversation's last `turns` messages, for the `conversations` most recently used."""

    def __init__(self, size: int, turns: int) -> None:
        self.size, self.turns = size, turns
        self._held: OrderedDict[str, list[dict[str, str]]] = OrderedDict()
        self._lock = threading.Lock()

    def history(self, context: Any) -> tuple[str, list[dict[str, str]]]:
        """The conversation a Wyoming `context` names (a new one when it names none we hold)."""
        cid = context.get("conversation_id") if isinstance(context, dict) else None
        with self._lock:
            if isinstance(cid, str) and cid in self._held:
                self._held.move_to_end(cid)
                return cid, list(self._held[cid])
        return uuid.uuid4().hex, []

    def add(self, cid: str, question: str, answer: str) -> None:
        with self._lock:
            turns = self._held.setdefault(cid, [])
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            del turns[:-self.turns]
            self._held.move_to_end(cid)
            while len(self._held) > self.size:
                self._held.popitem(last=False)


class WyomingServer:
    """Serves `engine` to Wyoming clients on its own thread and event loop; `start()`, then `stop()`."""

    def __init__(self, engine: Engine, model_name: str, config: WyomingConfig) -> None:
        self.engine = engine
        self.model_name = model_name
        self.config = config
        self.conversations = Conversations(config.conversations, config.turns)
        self.port = config.port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._server: asyncio.AbstractServer | None = None
        self._zeroconf: Any = None
        self._open = 0  # connections being served (only the event loop's thread counts them)
        self._thread = threading.Thread(target=self._run, name="edgellm-wyoming", daemon=True)

    def start(self) -> "WyomingServer":
        self._thread.start()
        self._ready.wait(30)
        if self._failure is not None:
            raise OSError(f"--wyoming {self.config.host}:{self.config.port}: {self._failure}") from None
        log.info("serving %s over Wyoming (handle) at tcp://%s:%d", self.model_name, self.config.host, self.port)
        return self

    def stop(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, self.config.host, self.config.port, limit=MAX_HEADER))
            self.port = self._server.sockets[0].getsockname()[1]
            self._loop.run_until_complete(self._announce())
        except OSError as exc:
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _announce(self) -> None:
        """`_wyoming._tcp` by mDNS, for Home Assistant to find; only where a network can reach us."""
        if not self.config.zeroconf or self.config.host in ("127.0.0.1", "localhost", "::1"):
            return
        try:
            from wyoming.zeroconf import HomeAssistantZeroconf
        except ImportError:
            log.info("zeroconf is not installed: add the Wyoming service in Home Assistant by host and port")
            return
        host = None if self.config.host in ("0.0.0.0", "::") else self.config.host
        try:
            self._zeroconf = HomeAssistantZeroconf(self.port, name=f"edgellm-{self.model_name}"[:60], host=host)
            await self._zeroconf.register_server()
        except OSError as exc:
            log.warning("could not announce the Wyoming service by zeroconf: %s", exc)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._zeroconf is not None:
            await self._zeroconf._aiozc.async_close()

    # -- one connection -----------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = f"wyoming:{peer[0] if peer else '?'}"
        if self._open >= self.config.max_connections:
            log.warning("wyoming: %d connections open; closing the one from %s", self._open, client)
            writer.close()
            return
        self._open += 1
        try:
            while (event := await read_event(reader)) is not None:
                if event["type"] == "describe":
                    await async_write_event(self.info().event(), writer)
                elif event["type"] == "transcript":
                    await self._handle(event["data"], client, writer)
        except ProtocolError as exc:
            log.info("wyoming client %s: %s; closing its connection", client, exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open -= 1
            writer.close()

    def info(self) -> Info:
        """One handle program, streaming, with the model and its languages."""
        attribution = Attribution(name="edgellm", url="https://github.com/edgellm/edgellm")
        model = HandleModel(name=self.model_name, attribution=attribution, installed=True,
                            description=f"{self.model_name} on edgellm", version=__version__,
                            languages=list(self.config.languages))
        return Info(handle=[HandleProgram(name="edgellm", attribution=attribution, installed=True,
                                          description="a small language model, served on this device",
                                          version=__version__, models=[model], supports_handled_streaming=True)])

    async def _handle(self, data: dict[str, Any], client: str, writer: asyncio.StreamWriter) -> None:
        """One transcript: the answer streamed by sentence, or `not-handled` with the reason."""
        text = data.get("text")
        cid, history = self.conversations.history(data.get("context"))
        context = {"conversation_id": cid}
        if not isinstance(text, str) or not text.strip():
            await async_write_event(NotHandled("the transcript has no text", context).event(), writer)
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            # The one message check every front runs, with the same limits as MQTT and HTTP.
            messages = check_messages([{"role": "system", "content": self.config.system}, *history,
                                       {"role": "user", "content": text}])
            # A spoken answer is short: within the service's --max-tokens whatever this front's default.
            params = self.engine.params({"max_new_tokens": min(self.config.max_tokens, self.engine.max_tokens)})
            refusal = self.engine.cannot_fit(messages, params) or self.engine.submit(
                Job(messages, params, client, put, put, cancel, tenant=f"wyoming:{cid}"))
        except GenerationError as exc:
            refusal = str(exc)
        if refusal is not None:
            await async_write_event(NotHandled(refusal, context).event(), writer)
            return
        try:
            answer = await self._stream(queue, writer, context)
        finally:
            cancel.set()  # a client gone mid-answer frees the slot; a no-op once it finished
        if answer is not None:
            self.conversations.add(cid, text, answer)

    async def _stream(self, queue: asyncio.Queue[Any], writer: asyncio.StreamWriter,
                      context: dict[str, Any]) -> str | None:
        splitter, parts, started = SentenceSplitter(), [], False
        while not isinstance(item := await queue.get(), Outcome):
            parts.append(item.text)
            for sentence in splitter.feed(item.text):
                if not started:
                    await async_write_event(HandledStart(context).event(), writer)
                    started = True
                await async_write_event(HandledChunk(sentence).event(), writer)
        if item.error is not None or item.waited_out:
            reason = "the service is shutting down" if item.waited_out else (
                str(item.error) if isinstance(item.error, GenerationError)
                else f"generation failed: {type(item.error).__name__}")
            if item.error is not None and not isinstance(item.error, GenerationError):
                log.error("wyoming request failed", exc_info=item.error)
            await async_write_event(NotHandled(reason, context).event(), writer)
            return None
        answer = "".join(parts).strip()
        if not started:
            await async_write_event(HandledStart(context).event(), writer)
        if rest := splitter.flush():
            await async_write_event(HandledChunk(rest).event(), writer)
        await async_write_event(HandledStop().event(), writer)
        await async_write_event(Handled(answer, context).event(), writer)
        return answer

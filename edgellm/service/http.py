"""The HTTP front: OpenAI- and Ollama-shaped routes over the same engine as MQTT.

Starlette routes on uvicorn, in a thread of the serving process. Generation runs on
the engine's worker thread; each job's chunks cross onto the event loop through
`call_soon_threadsafe` into an asyncio queue (`Run`). A client that goes away sets
the job's cancel event, so the worker stops at the next token. The routes live in
`http_openai` and `http_ollama`; this module holds what they share.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from .. import netjson
from ..engine import Engine, Job, Outcome
from ..errors import ContextLengthError, GenerationError
from ..params import spelled
from ..sequence import Result
from .http_conn import DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT
from .http_metrics import Metrics

log = logging.getLogger("edgellm.service")

DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 1 << 20  # a Home Assistant chat with many exposed entities is tens of KB


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = ()  # every route but /health then needs "Authorization: Bearer KEY"; a tenant each
    max_body: int = DEFAULT_MAX_BODY
    allow_origins: tuple[str, ...] = ()  # web page origins that may call the API ("*": any)
    server_names: tuple[str, ...] = ()  # Host names accepted without a key, besides IPs and this machine's name
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    read_timeout: float = DEFAULT_READ_TIMEOUT  # seconds for a request's headers and body to arrive


class HttpError(Exception):
    """A request answered with an error status; the route's shape (OpenAI or Ollama) writes the body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def bad_request(exc: GenerationError, names: Mapping[str, str]) -> HttpError:
    """400 for a request refused; the field it names (`exc.field`) spelled by the route's table."""
    message = spelled(exc, names)
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
    return HttpError(400, message, param=names.get(exc.field, exc.field), code=code)


_GONE = object()  # the client disconnected


@dataclass
class Run:
    """One job's chunks, carried from the engine's worker thread onto the event loop."""

    loop: asyncio.AbstractEventLoop
    names: Mapping[str, str]  # the route's spelling of each parameter (API name -> its field)
    cancel: threading.Event = field(default_factory=threading.Event)
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    first: Any = None
    outcome: Outcome | None = None
    _watch: asyncio.Task | None = None

    def put(self, item: Any) -> None:  # worker thread
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    def watch(self, request: Request) -> None:
        """Until `unwatch`: a disconnect cancels the job and ends the wait for its chunks."""
        async def until_gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.cancel.set()
            self.items.put_nowait(_GONE)

        self._watch = asyncio.ensure_future(until_gone())

    def unwatch(self) -> None:
        """A streaming response listens for the disconnect itself from here on."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def next(self) -> Any:
        item = await self.items.get()
        if item is _GONE:
            raise ClientDisconnect()
        return item

    async def chunks(self) -> AsyncIterator[Any]:
        """Every chunk (the first included); the outcome is then in `self.outcome`."""
        item = self.first
        while not isinstance(item, Outcome):
            yield item
            item = await self.next()
        self.outcome = item


class Front:
    """What every route needs: the engine, the served model's names, body reading, submitting."""

    def __init__(self, engine: Engine, config: HttpConfig, metrics: Metrics) -> None:
        self.engine = engine
        self.model = engine.model
        self.config = config
        self.metrics = metrics
        self.embedder: Any = None  # a retrieval.embed.Embedder: the embedding routes' model
        manifest = self.model.manifest
        self.name = manifest.name or getattr(getattr(self.model, "path", None), "name", "") or "edgellm"
        self.started = time.time()

    @property
    def tag(self) -> str:
        """The name as Ollama lists it (name:tag)."""
        return self.name if ":" in self.name else f"{self.name}:latest"

    @property
    def names(self) -> set[str]:
        """What a client may call the served model: the manifest's name the listings show, and the
        bundle folder's name (`smollm2-135m`), since that is what people type; each also as `NAME:latest`."""
        folder = getattr(getattr(self.model, "path", None), "name", "")
        return {n for name in (self.name, folder) if name for n in (name, f"{name}:latest")}

    def check_model(self, name: Any, field: str = "model") -> None:
        if name is None:
            return  # like llama.cpp's server: one model is served, naming it is optional
        if not isinstance(name, str):
            raise HttpError(400, f"{field} must be a string, got {type(name).__name__}", param=field)
        if name not in self.names:
            raise HttpError(404, f"model {name!r} not found; this server serves {self.name!r}", param=field,
                            code="model_not_found")

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object, refused with 413 once it passes the limit (before parsing),
        and with 400 for anything `netjson` refuses (bad UTF-8 or syntax, deep nesting, huge numbers)."""
        limit = self.config.max_body
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HttpError(413, f"body is {declared} bytes, limit is {limit}", code="too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise HttpError(413, f"body is over {limit} bytes, the limit", code="too_large")
        try:
            data = netjson.loads(bytes(body))
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
            raise HttpError(400, f"body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
        if b"\\u" in body and (where := netjson.surrogate_at(data)) is not None:  # only an escape writes one
            raise HttpError(400, f"body: {where} holds a lone surrogate (\\ud800-\\udfff), which is not text",
                            code="invalid_json")
        if not isinstance(data, dict):
            raise HttpError(400, f"body must be a JSON object, got {type(data).__name__}")
        return data

    async def submit(self, request: Request, prompt: Any, params: Mapping[str, Any],
                     names: Mapping[str, str]) -> Run:
        """Build the request's parameters (`Engine.params`, once), queue a job and wait for its first
        chunk: errors found before it (a prompt too long for the context) still get their own status,
        their field spelled as `names` has it.
        429 when the queue is full."""
        try:
            params = self.engine.params(params)  # the one build: the worker trusts what it gets
        except GenerationError as exc:
            raise bad_request(exc, names) from None
        if (refusal := self.engine.cannot_fit(prompt, params)) is not None:
            chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
            raise HttpError(400, refusal, param="messages" if chat else "prompt", code="context_length_exceeded")
        run = Run(asyncio.get_running_loop(), names)
        host = request.client.host if request.client else "?"
        job = Job(prompt, params, ("http", host), run.put, run.put, run.cancel, tenant=request.state.tenant)
        refusal = self.engine.submit(job)
        if refusal is not None:
            raise HttpError(429, f"busy: {refusal}", code="busy", headers={"Retry-After": "1"})
        run.watch(request)
        try:
            run.first = await run.next()
        except BaseException:
            run.cancel.set()
            run.unwatch()
            raise
        if isinstance(run.first, Outcome):
            run.unwatch()
            raise outcome_error(run.first, names)
        return run

    async def whole(self, run: Run) -> Result:
        """A job answered in one body: its last chunk's Result; a disconnect cancels it."""
        try:
            async for _ in run.chunks():
                pass
        finally:
            run.cancel.set()  # a no-op once it finished
            run.unwatch()
        if run.outcome.error is not None:
            raise outcome_error(run.outcome, run.names)
        return run.outcome.last.result


def outcome_error(outcome: Outcome, names: Mapping[str, str]) -> HttpError:
    """The status of a job that ended with no chunk, or of the error a stream ended with."""
    if outcome.waited_out:
        return HttpError(503, "cancelled before it started: the service is shutting down", code="cancelled")
    if isinstance(outcome.error, GenerationError):
        return bad_request(outcome.error, names)
    exc = outcome.error
    return HttpError(500, f"generation failed: {type(exc).__name__}: {exc}"[:300], code="internal")


Shape = Callable[[HttpError], Response]


def endpoint(front: Front, route: str, shape: Shape, handler: Callable[..., Any]) -> Callable[..., Any]:
    """`handler(front, request)` with its HttpErrors written in `shape` and counted by outcome."""
    async def call(request: Request) -> Response:
        try:
            response = await handler(front, request)
        except HttpError as exc:
            front.metrics.request(route, exc.status)
            return shape(exc)
        except ClientDisconnect:
            front.metrics.request(route, 499)
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - the client gets a 500, the server keeps serving
            front.metrics.request(route, 500)
            return shape(HttpError(500, f"internal error: {type(exc).__name__}: {exc}"[:300], code="internal"))
        front.metrics.request(route, response.status_code)
        return response
    return call


def openai_error(exc: HttpError) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 429: "rate_limit_error"}.get(exc.status, "server_error")
    body = {"error": {"message": str(exc), "type": kind, "param": exc.param, "code": exc.code}}
    return JSONResponse(body, exc.status, headers=exc.headers)


def ollama_error(exc: HttpError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, exc.status, headers=exc.headers)


def shape_of(path: str) -> Shape:
    return ollama_error if path.startswith("/api/") else openai_error

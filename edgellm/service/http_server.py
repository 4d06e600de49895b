"""The HTTP server: the app assembled from the route modules (`http_openai`, `http_ollama`,
`http_embed`) behind the guard, and uvicorn on its own thread taking connections from the
`Listener`. It sits above the modules it assembles, which share only `http`, so no route
module imports this one back."""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..engine import Engine
from . import http_embed, http_ollama, http_openai
from .http import Front, HttpConfig, HttpError, endpoint, openai_error, shape_of
from .http_conn import Limits, Listener, descriptor_room
from .http_guard import Guard, is_loopback
from .http_metrics import Metrics

log = logging.getLogger("edgellm.service")


async def _health(front: Front, _request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": front.name, "waiting": front.engine.waiting,
                         "busy": front.engine.active > 0, "active": front.engine.active})


async def _metrics(front: Front, _request: Request) -> Response:
    return Response(front.metrics.render(front.engine.waiting, front.engine.active > 0),
                    media_type="text/plain; version=0.0.4")


def build_app(engine: Engine, config: HttpConfig, metrics: Metrics | None = None, embedder: Any = None) -> Any:
    """The ASGI app: OpenAI and Ollama routes, /health and /metrics, behind the guard (key, origin,
    host, content type) and, when origins are allowed, starlette's CORS middleware. `embedder`
    (a retrieval.embed.Embedder) answers the embedding routes; without it they answer 404."""
    front = Front(engine, config, metrics or Metrics())
    front.embedder = embedder
    routes = [Route("/health", endpoint(front, "/health", openai_error, _health)),
              Route("/metrics", endpoint(front, "/metrics", openai_error, _metrics))]
    for module in (http_openai, http_ollama, http_embed):
        for path, methods, handler in module.ROUTES:
            routes.append(Route(path, endpoint(front, path, shape_of(path), handler), methods=methods))

    async def not_found(request: Request, exc: HTTPException) -> Response:
        error = HttpError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code="not_found",
                          headers=exc.headers)  # a 405's Allow
        return shape_of(request.url.path)(error)

    app: Any = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    if config.allow_origins:
        app = CORSMiddleware(app, allow_origins=config.allow_origins, allow_methods=("GET", "POST"),
                             allow_headers=("Authorization", "Content-Type"))
    return Guard(app, config)


class HttpServer:
    """uvicorn on its own thread, bound before `start` returns (a port in use fails here, in the caller);
    its connections come from a `Listener` within `config.max_connections` and `config.read_timeout`."""

    def __init__(self, engine: Engine, config: HttpConfig, metrics: Metrics | None = None,
                 embedder: Any = None) -> None:
        self.config = config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((config.host, config.port))
        except OSError as exc:
            self.socket.close()
            raise OSError(f"--http {config.host}:{config.port}: {exc.strerror or exc}") from None
        self.socket.listen(128)
        self.port = self.socket.getsockname()[1]
        self.metrics = metrics or Metrics()
        engine.observers.append(self.metrics.finished)
        if not config.api_keys and not is_loopback(config.host):
            log.warning("HTTP on %s without an API key: anyone who can reach the port can use the model "
                        "(set --api-key-file, or bind 127.0.0.1)", self.url)
        room = descriptor_room()
        if config.max_connections > room:
            log.warning("--http-max-connections %d lowered to %d: the file descriptor limit (ulimit -n) leaves "
                        "no room for more", config.max_connections, max(1, room))
        self.listener = Listener(self.socket, Limits(max(1, min(config.max_connections, room)), config.read_timeout),
                                 self.metrics)
        # h11 named, not "auto": the listener's deadline reads h11's state (httptools would replace it).
        # No websockets: an upgraded connection would leave the listener's protocol, and its count.
        # Errors only: uvicorn warns once per malformed or upgrade request, a log flood on demand.
        uv_config = uvicorn.Config(build_app(engine, config, self.metrics, embedder), http="h11", ws="none",
                                   log_level="error", lifespan="off", access_log=False, timeout_graceful_shutdown=2)
        self._server = _Uvicorn(uv_config, self.listener)
        self._thread = threading.Thread(target=self._server.run, name="edgellm-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "HttpServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self.socket.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn with no asyncio server of its own: connections come from the listener."""

    def __init__(self, config: uvicorn.Config, listener: Listener) -> None:
        super().__init__(config)
        self.listener = listener

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])
        config = self.config
        self.listener.start(asyncio.get_running_loop(), lambda: config.http_protocol_class(
            config=config, server_state=self.server_state, app_state=self.lifespan.state))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.listener.stop()
        await super().shutdown(sockets=[])

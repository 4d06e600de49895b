"""A real uvicorn on a free loopback port, serving a model through a real engine."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

import edgellm
from edgellm.engine import Engine
from edgellm.service.http import HttpConfig
from edgellm.service.http_server import HttpServer
from engine_helpers import Hooked
from tests.tiny import QWEN3_TEMPLATE, THINK_TOOL_TOKENS

LIGHT = {"type": "object", "properties": {"on": {"type": "boolean"}, "level": {"type": "integer", "minimum": 0,
                                                                              "maximum": 100}},
         "required": ["on"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "set_light", "description": "Switch the light",
                                           "parameters": LIGHT}}]


def load_qwen3(tiny_bundle_factory: Any) -> Any:
    """The tiny Qwen3-shaped model of tests/test_tool_calls.py: think markers, call tags, a template with tools."""
    return edgellm.load(tiny_bundle_factory("qwen3", added_tokens=THINK_TOOL_TOKENS, chat_template=QWEN3_TEMPLATE,
                                            max_position_embeddings=2048))


@contextlib.contextmanager
def serving(model: Any, queue_size: int = 8, max_tokens: int = 1024, **config: Any) -> Iterator[HttpServer]:
    """An engine and its HTTP server on 127.0.0.1 (port chosen by the OS), closed on exit."""
    engine = Engine(model, queue_size=queue_size, max_tokens=max_tokens).start()
    server = HttpServer(engine, HttpConfig(port=0, **config)).start()
    server.engine = engine
    try:
        yield server
    finally:
        server.stop()
        engine.close()


class Paced(Hooked):
    """A real model whose chunks come `delay` seconds apart, counted as they are made (the
    final one apart), so a test can tell how many were generated after it hung up; it keeps
    each request's tenant and cache salt. One request at a time: the engine's one slot."""

    def __init__(self, model: Any, delay: float = 0.05) -> None:
        super().__init__(model)
        self.delay = delay
        self.chunks = 0
        self.last: Any = None
        self.done = threading.Event()
        self.requests: list[dict[str, Any]] = []  # each request's tenant (the engine's) and cache_salt

    def added(self, params: Any, tenant: str) -> None:
        self.chunks, self.last = 0, None
        self.requests.append({"tenant": tenant, "cache_salt": params.cache_salt})
        self.done.clear()

    def event(self, event: Any) -> None:
        if isinstance(event, Exception):
            self.done.set()
            return
        time.sleep(self.delay)
        self.chunks += event.finish_reason is None
        self.last = event
        if event.finish_reason is not None:
            self.done.set()

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


class Paced:
    """A real model whose chunks come `delay` seconds apart, counted as they are yielded (the
    final one apart), so a test can tell how many were generated after it hung up; it keeps
    each request's parameters."""

    def __init__(self, model: Any, delay: float = 0.05) -> None:
        self.model = model
        self.delay = delay
        self.manifest = model.manifest
        self.max_context = model.max_context
        self.path = model.path
        self.tokenizer = model.tokenizer
        self.chunks = 0
        self.last: Any = None
        self.done = threading.Event()
        self.requests: list[dict[str, Any]] = []  # each request's parameters, the engine's tenant among them

    def stream(self, prompt: Any, **params: Any) -> Iterator[Any]:
        self.chunks, self.last = 0, None
        self.requests.append(params)
        self.done.clear()
        try:
            for chunk in self.model.stream(prompt, **params):
                time.sleep(self.delay)
                self.chunks += chunk.finish_reason is None
                self.last = chunk
                yield chunk
        finally:
            self.done.set()

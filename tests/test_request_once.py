"""A request is checked once, where it arrives (issue 21 item 2).

Each front parses its wire fields into one checked, frozen `GenerationParams` on its own
thread; the engine's grammar thread and worker build the `Sequence` from that value without
checking it again. Counted on real fronts (HTTP on uvicorn, MQTT on mosquitto, Wyoming over
TCP) and a real engine: the real check functions run, wrapped only to count who calls them.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

import edgellm.params
import edgellm.tools
from edgellm.engine import Engine
from edgellm.errors import GenerationError
from edgellm.messages import MAX_MESSAGES
from edgellm.service.broker import find_mosquitto
from http_helpers import TOOLS, load_qwen3, serving
from mqtt_helpers import connection, running_service

ASK = [{"role": "user", "content": "Hello there"}]
WORKERS = ("edgellm-generate", "edgellm-grammar")


class Calls:
    """Each call of `module.name` (the real function) counted by the thread that made it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> None:
        self.by_thread: Counter[str] = Counter()
        real = getattr(module, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.by_thread[threading.current_thread().name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    @property
    def on_workers(self) -> int:
        return sum(n for thread, n in self.by_thread.items() if thread in WORKERS)

    @property
    def total(self) -> int:
        return sum(self.by_thread.values())


def test_an_http_request_is_checked_once_and_never_on_the_worker(model, monkeypatch):
    checks = Calls(monkeypatch, edgellm.params, "check")
    with serving(model) as server:
        body = {"messages": ASK, "max_tokens": 5, "temperature": 0.5, "seed": 1,
                "response_format": {"type": "json_object"}}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    # Before: each of the 4 fields was checked again on the grammar thread and again on the worker.
    assert checks.on_workers == 0, checks.by_thread
    assert checks.total == 4, checks.by_thread


def test_tool_choice_is_settled_once(tiny_bundle_factory, monkeypatch):
    model = load_qwen3(tiny_bundle_factory)
    settles = Calls(monkeypatch, edgellm.tools, "settle_choice")
    with serving(model) as server:
        body = {"messages": ASK, "max_tokens": 8, "tools": TOOLS, "tool_choice": "required"}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    # Before: settled by the front, the grammar thread (twice), the worker's build, the prompt and the sequence.
    assert settles.total == 1 and settles.on_workers == 0, settles.by_thread


@pytest.mark.mqtt
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)")
@pytest.mark.timeout(60)
def test_an_mqtt_request_is_checked_once_and_never_on_the_worker(broker, probe, model, monkeypatch):
    checks = Calls(monkeypatch, edgellm.params, "check")
    with running_service(model, connection(broker.url)):
        probe.publish("edgellm/dev1/request", {"id": "once", "messages": ASK, "max_tokens": 5, "top_k": 3,
                                              "stream": False})
        final = probe.replies("once", timeout=30)[-1]
    assert final.get("done"), final
    assert checks.on_workers == 0, checks.by_thread
    assert checks.total == 2, checks.by_thread


def test_the_ceiling_is_part_of_the_one_build(model):
    engine = Engine(model, max_tokens=16)
    assert engine.params({}).max_new_tokens == 16  # the bundle's default (256) held to the ceiling
    assert engine.params({"max_new_tokens": 9}).max_new_tokens == 9
    with pytest.raises(GenerationError) as refused:
        engine.params(edgellm.params.from_wire({"max_tokens": 17}))
    assert refused.value.field == "max_new_tokens" and "at most 16" in str(refused.value)


def test_wyoming_refuses_an_oversized_conversation_with_the_limit_of_mqtt_and_http(model):
    from wyoming.asr import Transcript
    from wyoming.client import AsyncTcpClient
    from wyoming.handle import NotHandled

    from edgellm.service.wyoming import WyomingConfig, WyomingServer

    engine = Engine(model, max_tokens=16).start()
    queued: list[Any] = []
    engine.observers.append(queued.append)  # told of every job that entered the engine
    server = WyomingServer(engine, "tiny", WyomingConfig(port=0, max_tokens=8, turns=4 * MAX_MESSAGES)).start()
    try:
        cid = "long"
        for i in range(MAX_MESSAGES // 2):  # the conversation a long-lived voice session would hold
            server.conversations.add(cid, f"q{i}", f"a{i}")

        async def ask() -> Any:
            async with AsyncTcpClient("127.0.0.1", server.port) as client:
                await client.write_event(Transcript(text="and now?", context={"conversation_id": cid}).event())
                while not NotHandled.is_type((event := await asyncio.wait_for(client.read_event(), 60)).type):
                    pass
                return NotHandled.from_event(event)

        refused = asyncio.run(ask())
        time.sleep(0.2)  # an observer hears of a job's end after its client has the answer
    finally:
        server.stop()
        engine.close()
    entries = 1 + MAX_MESSAGES + 1  # system, the held turns, the transcript
    with serving(model) as http:
        messages = [{"role": "user", "content": "x"}] * entries
        reply = httpx.post(f"{http.url}/v1/chat/completions", json={"messages": messages}, timeout=60)
    assert reply.status_code == 400
    assert not queued, "refused on the worker, after waiting its turn, instead of where it arrived"
    assert refused.text == reply.json()["error"]["message"] == \
        f"messages has {entries} entries, limit is {MAX_MESSAGES}"

"""The Wyoming `handle` front, driven by the wyoming package's own client (Home Assistant's
library) over real TCP on 127.0.0.1, against a real engine on the tiny bundle."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("wyoming")

from wyoming.asr import Transcript  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402

from edgellm.engine import Engine  # noqa: E402
from edgellm.service.wyoming import MAX_DATA, WyomingConfig, WyomingServer  # noqa: E402


@pytest.fixture
def served(model):
    engine = Engine(model, max_tokens=64).start()
    prompts: list[int] = []
    engine.observers.append(lambda outcome: prompts.append(outcome.last.usage.prompt_tokens) if outcome.last else None)
    server = WyomingServer(engine, "tiny", WyomingConfig(port=0, max_tokens=24)).start()
    yield server, prompts
    server.stop()
    engine.close()


async def ask(port: int, text: str, context: dict | None = None) -> list:
    """Every event up to and including `handled` or `not-handled`, as a pre-streaming client reads."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcript(text=text, context=context).event())
        events = []
        while True:
            event = await asyncio.wait_for(client.read_event(), 60)
            assert event is not None, "connection closed before the answer"
            events.append(event)
            if Handled.is_type(event.type) or NotHandled.is_type(event.type):
                return events


def test_describe_names_a_streaming_handle_program(served):
    server, _ = served

    async def describe():
        async with AsyncTcpClient("127.0.0.1", server.port) as client:
            await client.write_event(Describe().event())
            return Info.from_event(await asyncio.wait_for(client.read_event(), 10))

    info = asyncio.run(describe())
    (program,) = info.handle
    assert program.supports_handled_streaming and program.models[0].name == "tiny"
    assert program.models[0].languages == ["en"]


def test_a_transcript_streams_sentences_then_says_handled(served):
    server, _ = served
    events = asyncio.run(ask(server.port, "What time is it?"))
    types = [e.type for e in events]
    assert types[0] == "handled-start" and types[-2:] == ["handled-stop", "handled"]
    assert set(types[1:-2]) == {"handled-chunk"}
    chunks = [HandledChunk.from_event(e).text for e in events[1:-2]]
    handled = Handled.from_event(events[-1])
    assert "".join(chunks).strip() == handled.text and handled.text  # an older client gets the same answer whole
    assert HandledStart.from_event(events[0]).context == handled.context
    assert HandledStop.is_type(events[-2].type)


def test_the_context_carries_the_conversation_to_the_next_turn(served):
    server, prompts = served
    first = Handled.from_event(asyncio.run(ask(server.port, "My name is Ada."))[-1])
    second = Handled.from_event(asyncio.run(ask(server.port, "What is my name?", first.context))[-1])
    fresh = Handled.from_event(asyncio.run(ask(server.port, "What is my name?"))[-1])
    assert second.context == first.context and fresh.context != first.context
    deadline = time.monotonic() + 10  # observers hear of a job's end after its client has the answer
    while len(prompts) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prompts[1] > prompts[2]  # the second turn's prompt holds the first turn; a fresh one does not


def test_errors_answer_not_handled_and_a_hostile_client_only_loses_its_own_connection(served):
    server, _ = served
    (refused,) = asyncio.run(ask(server.port, "word " * 6000))
    assert NotHandled.is_type(refused.type) and "context" in NotHandled.from_event(refused).text

    async def hostile() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(json.dumps({"type": "transcript", "data_length": MAX_DATA + 1}).encode() + b"\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)  # closed without reading the data

    assert asyncio.run(hostile()) == b""
    assert Handled.is_type(asyncio.run(ask(server.port, "Still there?"))[-1].type)

    async def flood() -> bytes:
        """Every place taken by idle connections: one more is closed at once, and a place that frees is reused."""
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(server.config.max_connections)]
        await asyncio.sleep(0.2)
        reader, _ = await asyncio.open_connection("127.0.0.1", server.port)
        refused = await asyncio.wait_for(reader.read(), 10)
        held.pop()[1].close()
        await asyncio.sleep(0.2)
        events = await ask(server.port, "And now?")
        for _, writer in held:
            writer.close()
        assert Handled.is_type(events[-1].type)
        return refused

    assert asyncio.run(flood()) == b""


@pytest.mark.timeout(120)
def test_serve_wyoming_answers_alone_without_mqtt(tiny_bundle):
    """`edgellm serve BUNDLE --wyoming HOST:PORT` as docs/home-assistant.md shows it: Wyoming only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", str(tiny_bundle), "--wyoming", f"127.0.0.1:{port}",
           "--max-tokens", "16", "--shared-system", "Answer briefly."]
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        assert Handled.is_type(asyncio.run(ask(port, "Hello?"))[-1].type)
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "over Wyoming" in err and "embedded" not in err  # no broker was started

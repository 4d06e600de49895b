"""`retrieval` as a request parameter (issue 23 item 3): every front names a served index and k,
the question's nearest chunks go into the chat as numbered sources, and the final result
carries them as citations. Real SmolLM2-135M, the real all-MiniLM-L6-v2 (int8) embedding
bundle, an index built from a small manual, real uvicorn and a real mosquitto."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

import edgellm
from edgellm.engine import Engine
from edgellm.errors import GenerationError
from edgellm.params import from_wire
from edgellm.retrieval.embed import Embedder
from edgellm.retrieval.index import Index
from edgellm.retrieval.retriever import Retriever
from edgellm.service.broker import find_mosquitto
from edgellm.service.http import HttpConfig
from edgellm.service.http_server import HttpServer
from edgellm.service.server import Service, ServiceConfig
from mqtt_helpers import connection, load_schema

pytestmark = [pytest.mark.slow]

MANUAL = {
    "pumps.md": """# Pumps

## Cavitation
When the suction pressure drops below the vapour pressure, bubbles form in the water and
collapse on the impeller. The collapsing bubbles pit the impeller and the pump sounds like
gravel. Raise the suction head, open the suction valve fully and clean the inlet strainer.

## Mechanical seals
A seal that drips at the shaft is worn. Replace the seal faces and check the shaft for runout.
""",
    "motors.md": """# Motors

## Overheating
A motor that trips its thermal relay runs too hot: clean the cooling fins, check the fan, and
measure the current on each phase.

## Bearings
Grease the motor bearings every 2,000 hours with lithium grease. A growling bearing is dry or worn.
""",
    "conveyors.md": """# Conveyors

## Belt tracking
A belt that runs to one side needs its idlers aligned. Adjust the tail pulley a quarter turn at a time.
""",
}
QUESTION = "Why is the impeller of the pump pitted? What should I do?"
ASK = [{"role": "user", "content": QUESTION}]
RETRIEVAL = {"index": "manual", "k": 2}


@pytest.fixture(scope="module")
def served(smollm2_bundle, minilm, tmp_path_factory):
    """SmolLM2 answering from the manual's index (built with MiniLM int8), on one engine."""
    root = tmp_path_factory.mktemp("manual")
    for name, text in MANUAL.items():
        (root / name).write_text(text)
    embedder = Embedder(edgellm.load(minilm["int8"]))
    with Index(root / "manual.sqlite") as index:
        index.add([root], embedder.model)
    model = edgellm.load(smollm2_bundle)
    model.retriever = Retriever({"manual": root / "manual.sqlite"}, embedder)
    engine = Engine(model, max_tokens=64).start()
    yield model, engine, embedder
    engine.close()


def _cites_cavitation(citations: list[dict[str, Any]], text: str) -> None:
    """The known section is the first source, and each source is marked cited as the answer names it."""
    jsonschema.validate(citations, load_schema("final")["properties"]["citations"])
    assert Path(citations[0]["path"]).name == "pumps.md" and citations[0]["heading"] == "Pumps > Cavitation"
    assert len(citations) == 2 and [c["n"] for c in citations] == [1, 2]
    assert [c["cited"] for c in citations] == [f"[{c['n']}]" in text for c in citations]


def test_the_python_api_grounds_and_cites(served):
    model, _, _ = served
    result = model.generate(ASK, max_new_tokens=48, retrieval=RETRIEVAL)
    _cites_cavitation(result.citations, result.text)
    plain = model.generate(ASK, max_new_tokens=48)
    assert plain.citations == [] and plain.usage.prompt_tokens < result.usage.prompt_tokens


def test_http_fronts_cite_the_known_section(served):
    model, engine, embedder = served
    grounding_threads: list[str] = []
    ground = model.retriever.ground

    def counted(*args: Any) -> Any:  # the real one, counted by the thread that runs it
        grounding_threads.append(threading.current_thread().name)
        return ground(*args)

    model.retriever.ground = counted
    server = HttpServer(engine, HttpConfig(port=0), embedder=embedder).start()
    try:
        openai = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "messages": ASK, "max_tokens": 48, "retrieval": RETRIEVAL}).json()
        ollama = httpx.post(f"{server.url}/api/chat", timeout=120, json={
            "messages": ASK, "options": {"num_predict": 48}, "retrieval": RETRIEVAL, "stream": False}).json()
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120, json={
                "messages": ASK, "max_tokens": 48, "retrieval": RETRIEVAL, "stream": True}) as streamed:
            events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
        unknown = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "messages": ASK, "retrieval": {"index": "wiki"}})
        text = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "prompt": QUESTION, "retrieval": RETRIEVAL})
        listed = httpx.get(f"{server.url}/v1/models").json()
        tags = httpx.get(f"{server.url}/api/tags").json()
    finally:
        server.stop()
        del model.retriever.ground
    message = openai["choices"][0]["message"]
    _cites_cavitation(message["citations"], message["content"])
    _cites_cavitation(ollama["citations"], ollama["message"]["content"])
    (finish,) = [c for e in events for c in e["choices"] if c["finish_reason"] is not None]
    assert finish["delta"]["citations"] == message["citations"]  # a stream: on the delta with the finish reason
    assert message["content"] == ollama["message"]["content"]  # one path: the same prompt, the same tokens
    # Embedded on the engine's preparing thread: neither the event loop nor the decoding worker waits for it.
    assert set(grounding_threads) == {"edgellm-grammar"}, grounding_threads
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "retrieval"
    assert unknown.json()["error"]["message"].startswith("retrieval.index 'wiki' is not an index this model serves")
    assert text.status_code == 400 and "retrieval needs chat messages" in text.json()["error"]["message"]
    assert [m["id"] for m in listed["data"]] == [model.manifest.name, embedder.model.name]
    assert len(tags["models"]) == 2 and tags["models"][1]["name"].startswith(embedder.model.name)


@pytest.mark.mqtt
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)")
@pytest.mark.timeout(180)
def test_mqtt_final_reply_carries_the_citations(served, broker, probe):
    model, engine, embedder = served
    service = Service(model, connection(broker.url), ServiceConfig(device_id="dev1"), engine, embedder).start()
    try:
        assert service.connected.wait(10), "service did not connect"
        time.sleep(0.1)  # SUBACK: the subscription is live before the requests
        request = service.topics.request
        probe.publish(request, {"id": "r1", "messages": ASK, "max_tokens": 48, "retrieval": RETRIEVAL,
                                "stream": False})
        final = probe.replies("r1", timeout=120)[-1]
        probe.publish(request, {"id": "r2", "messages": ASK, "retrieval": {"index": "manual", "k": 99}})
        too_many = probe.replies("r2", timeout=30)[-1]
    finally:
        service.stop()
    jsonschema.validate(final, load_schema("final"))
    _cites_cavitation(final["citations"], final["text"])
    assert too_many["error"]["code"] == "bad_request"
    assert too_many["error"]["message"].startswith("retrieval.k must be an integer in [1, 16]")


def test_without_indexes_retrieval_is_refused_naming_the_field(tiny_bundle):
    model = edgellm.load(tiny_bundle)
    with pytest.raises(GenerationError) as refused:
        Engine(model).params(from_wire({"retrieval": {"index": "manual"}}))
    assert refused.value.field == "retrieval" and "--index NAME=FILE --embedding BUNDLE" in str(refused.value)

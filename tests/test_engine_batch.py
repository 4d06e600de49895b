"""The engine with several slots: requests from any front decode together, each answered as if alone."""
from __future__ import annotations

import threading

import pytest

import edgellm
from edgellm.engine import Engine, Job, Outcome
from edgellm.errors import GenerationError
from edgellm.runtime.bundle import Graph
from edgellm.service import protocol as proto
from edgellm.service.broker import find_mosquitto
from mqtt_helpers import connection, running_service

PROMPTS = ["The quick brown fox", "Edge boards run small language models close to the sensors.",
           [{"role": "user", "content": "What is the capital of France?"}], "Hello"]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return edgellm.load(tiny_bundle)


class Collected:
    """One job's chunks and outcome, and how many jobs the engine ran at once while it decoded."""

    def __init__(self, engine: Engine, prompt, **params) -> None:
        self.chunks: list = []
        self.outcome: Outcome | None = None
        self.done = threading.Event()
        self.together = 0
        self.job = Job(prompt, engine.params(params), client=id(self), on_chunk=self._chunk, on_end=self._end)
        self._engine = engine

    def _chunk(self, chunk) -> None:
        self.chunks.append(chunk)
        self.together = max(self.together, self._engine.active)

    def _end(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done.set()


def run_all(engine: Engine, requests: list[tuple]) -> list[Collected]:
    jobs = [Collected(engine, prompt, **params) for prompt, params in requests]
    for job in jobs:
        assert engine.submit(job.job) is None
    for job in jobs:
        assert job.done.wait(60), "a job never ended"
    return jobs


def test_requests_decode_together_and_answer_as_alone(model):
    requests = [(p, {"max_new_tokens": n, **extra}) for p, n, extra in zip(
        PROMPTS, (12, 20, 7, 16), ({}, {"temperature": 0.9, "seed": 3}, {}, {"repetition_penalty": 1.3}))]
    alone = []
    for prompt, params in requests:
        model.reset()
        alone.append(model.generate(prompt, **params))
    engine = Engine(model, queue_size=8, slots=2).start()
    try:
        jobs = run_all(engine, requests)
    finally:
        engine.close()
    assert max(j.together for j in jobs) == 2  # two slots decoded in one step
    for job, expected in zip(jobs, alone):
        assert job.outcome.error is None
        got = job.outcome.last.result
        assert [t for c in job.chunks for t in c.token_ids] == got.token_ids
        assert got.token_ids == expected.token_ids and got.text == expected.text
        assert job.outcome.last.finish_reason == expected.finish_reason


def test_a_bad_or_cancelled_request_leaves_the_others_alone(model):
    engine = Engine(model, queue_size=8, slots=3).start()
    try:
        long = Collected(engine, "The quick brown fox", max_new_tokens=40)
        cancelled = Collected(engine, "Hello", max_new_tokens=400, ignore_eos=True)  # still running when cancelled
        bad = Collected(engine, "x " * 5000, max_new_tokens=4)  # longer than the context
        for job in (long, cancelled, bad):
            assert engine.submit(job.job) is None
        while len(cancelled.chunks) < 3 and not cancelled.done.is_set():
            threading.Event().wait(0.01)
        cancelled.job.cancel.set()
        for job in (long, cancelled, bad):
            assert job.done.wait(60)
    finally:
        engine.close()
    assert isinstance(bad.outcome.error, GenerationError) and "context" in str(bad.outcome.error)
    assert cancelled.outcome.last.finish_reason == "cancelled"
    model.reset()
    assert long.outcome.last.result.token_ids == model.generate("The quick brown fox", max_new_tokens=40).token_ids


def test_slots_are_refused_unless_a_positive_integer(model):
    with pytest.raises(ValueError, match="slots must be an integer >= 1, got 0"):
        Engine(model, slots=0)


def test_a_graph_without_a_batch_dimension_serves_one_at_a_time(model, caplog):
    class Old:  # a bundle exported before batching: its manifest has no graph.batch
        manifest = type("M", (), {"graph": Graph("fast", "model.onnx", (), ()), "generation": {}})()
        max_context = model.max_context
        tokenizer = model.tokenizer
        params = model.params
        prompt_ids = model.prompt_ids
        scheduler = model.scheduler

    engine = Engine(Old(), slots=4).start()
    try:
        assert engine.slots == 1 and "has no batch dimension" in caplog.text
        (job,) = run_all(engine, [("Hello", {"max_new_tokens": 5})])
    finally:
        engine.close()
    assert job.outcome.error is None and len(job.outcome.last.result.token_ids) == 5


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)")
@pytest.mark.timeout(60)
def test_mqtt_requests_share_the_slots(broker, probe, model):
    topics = proto.Topics("edgellm", "dev1")
    expected = {}
    for i, prompt in enumerate(PROMPTS[:3]):
        model.reset()
        expected[f"b{i}"] = model.generate(prompt, max_new_tokens=10).text
    with running_service(model, connection(broker.url), slots=3) as service:
        assert service.status()["capabilities"]["slots"] == 3
        for i, prompt in enumerate(PROMPTS[:3]):
            field = "messages" if isinstance(prompt, list) else "prompt"
            probe.publish(topics.request, {"id": f"b{i}", field: prompt, "max_tokens": 10, "stream": False},
                          response_topic=f"dev/{i}/answers")
        finals = {rid: probe.replies(rid)[-1] for rid in expected}
    assert {rid: f["text"] for rid, f in finals.items()} == expected

"""Grammars compile off the threads that receive and decode requests, within limits, and a
failed one leaves nothing behind (issue 19, items 1 and 2), on the tiny bundle's real
onnxruntime session through a real Engine.

Before: a regex whose lexer explodes, (x{1000}){N}, was compiled on the worker (1-6 s) and
kept in the compiled-grammar cache after it failed (+160 MiB a request, 32 kept); a schema
was validated, and its fault searched for, on the thread that received the request (3.5 s
for the 62 KB schema below, 34 s for 469 KB).
"""
from __future__ import annotations

import gc
import threading
import time
from typing import Any

import psutil
import pytest

from edgellm.engine import Engine, FairQueue, Job, Outcome
from edgellm.errors import GenerationError
from edgellm.params import from_wire
from edgellm.runtime.residency import release_freed_heap


def _exploding(n: int) -> dict[str, Any]:
    return {"grammar": {"type": "regex", "value": f"(x{{1000}}){{{n}}}"}, "max_tokens": 4}


def _unsatisfiable(properties: int) -> dict[str, Any]:
    """A schema with one property that can hold no value, among many: invalid, and slow to
    say where (about 62 KB for 1,700 properties)."""
    props = {f"p{i}": {"type": "string"} for i in range(properties)}
    props["p7"] = {"type": "array", "minItems": 5, "maxItems": 2}
    schema = {"type": "object", "properties": props, "required": list(props)}
    return {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}


class Asked:
    """A job submitted the way a front does it: its wire fields checked on this thread (and
    `api` parameters no wire carries)."""

    def __init__(self, engine: Engine, wire: dict[str, Any], prompt: str = "x", client: str = "c",
                 **api: Any) -> None:
        self.stamps: list[float] = []
        self.outcome: Outcome | None = None
        self.done = threading.Event()
        self.cancel = threading.Event()
        started = time.perf_counter()
        params = engine.params({**from_wire(wire), **api})
        refusal = engine.submit(Job(prompt, params, client, lambda _: self.stamps.append(time.perf_counter()),
                                    self._end, self.cancel))
        self.receiving_s = time.perf_counter() - started  # what the front's thread spent on it
        assert refusal is None, refusal

    def _end(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done.set()

    def error(self, timeout: float = 120) -> Exception | None:
        assert self.done.wait(timeout), "no answer"
        return self.outcome.error


def _rss_mib() -> float:
    gc.collect()
    release_freed_heap()
    return psutil.Process().memory_info().rss / 2**20


def _exploding_pattern(n: int) -> dict[str, Any]:
    schema = {"type": "string", "pattern": f"^(x{{1000}}){{{n}}}$"}
    return {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}, "max_tokens": 4}


def test_exploding_grammars_are_refused_and_leave_no_memory_behind(model):
    engine = Engine(model).start()
    try:
        assert Asked(engine, {"grammar": {"type": "regex", "value": "[a-z]+"}, "max_tokens": 2}).error() is None
        before = _rss_mib()
        answers = [(field, Asked(engine, wire).error()) for n in (1000, 999)
                   for wire, field in ((_exploding(n), "grammar"), (_exploding_pattern(n), "response_format.json_schema.schema"))]
        grown = _rss_mib() - before
        assert engine.waiting == 0
    finally:
        engine.close()
    # Before: +160 MiB a request (650 MiB for these 4), kept in the compiled-grammar cache.
    assert grown < 64, f"RSS grew {grown:.0f} MiB over 4 exploding grammars"
    for field, error in answers:
        assert isinstance(error, GenerationError), error
        assert str(error).startswith(f"{field}: ") and "limits" in str(error), error


def test_a_slow_schema_does_not_hold_the_thread_that_received_it(model):
    """That thread only checks shapes; validation and the search for the faulty part run on
    the engine's grammar thread."""
    engine = Engine(model).start()
    try:
        slow = Asked(engine, _unsatisfiable(1700))
        error = slow.error()
    finally:
        engine.close()
    # Before: 3.5 s (x86-64 shared by other jobs) on this thread, in the front's event loop.
    assert slow.receiving_s < 0.25, f"the receiving thread spent {slow.receiving_s:.2f} s"
    assert isinstance(error, GenerationError) and str(error).startswith("response_format.json_schema.schema")
    assert "p7" in str(error), error


def _streaming(engine: Engine) -> Asked:
    """A long answer (2,000 tokens, several seconds on the tiny bundle), once it has begun."""
    stream = Asked(engine, {"max_tokens": 2000}, "Once", client="s", ignore_eos=True)
    deadline = time.monotonic() + 60
    while not stream.stamps and time.monotonic() < deadline:
        time.sleep(0.01)
    return stream


def test_a_grammar_compiling_does_not_stall_the_stream_beside_it(model):
    """With two slots, a grammar compiled on the worker stalled the other slot's stream for
    the whole compile: 1-6 s for each of these."""
    engine = Engine(model, max_tokens=2000, slots=2).start()
    try:
        stream = _streaming(engine)
        started = time.perf_counter()
        for job in [Asked(engine, _exploding(n), client=f"e{n}") for n in (1000, 999)]:
            assert isinstance(job.error(), GenerationError)
        ended = time.perf_counter()
        stream.cancel.set()
        # Before, the grammar's error ended every request of the step it failed in.
        assert stream.error() is None, f"another request's grammar ended the stream: {stream.error()}"
    finally:
        engine.close()
    gaps = [b - a for a, b in zip(stream.stamps, stream.stamps[1:]) if b > started and a < ended]
    assert gaps, "the stream ended before the grammars were submitted: nothing measured"
    assert max(gaps) < 1.0, f"the stream stalled {max(gaps):.2f} s"


def test_a_grammar_failing_mid_answer_ends_only_its_own_request(model):
    """It passes its first step and fails at the fourth token, on the worker: with two slots
    its error ended every request of the step."""
    engine = Engine(model, max_tokens=2000, slots=2).start()
    try:
        stream = _streaming(engine)
        late = Asked(engine, {"grammar": {"type": "regex", "value": "[a-z]{3}(x{1000}){1000}"}, "max_tokens": 40,
                              "temperature": 1.0, "seed": 2}, client="a")
        error = late.error()
        alive = not stream.done.is_set()
        stream.cancel.set()
        assert stream.error() is None, f"another request's grammar ended the stream: {stream.error()}"
    finally:
        engine.close()
    assert alive
    assert isinstance(error, GenerationError) and str(error).startswith("grammar: ") and "limits" in str(error)


def test_a_schema_too_big_to_compile_quickly_is_refused_on_arrival():
    """617 KB: validating it alone took 3.5 s, in a call nothing can interrupt."""
    started = time.perf_counter()
    with pytest.raises(GenerationError, match=r"^response_format\.json_schema\.schema as JSON is \d+ characters, "
                                              r"more than the limit of 65536"):
        from_wire(_unsatisfiable(16000))
    assert time.perf_counter() - started < 1.0
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {
        "type": "object", "properties": {f"p{j}": {"type": "string"} for j in range(300)}}}} for i in range(20)]
    with pytest.raises(GenerationError, match=r"^tools: the parameter schemas come to \d+ characters of JSON"):
        from_wire({"tools": tools})


def test_fair_queue_places():
    queue: FairQueue[str] = FairQueue(capacity=3, per_client=2)
    assert queue.hold("a") is None and queue.put("a", "a1") is None
    assert queue.put("a", "a2") is not None  # the held place counts
    assert queue.put("b", "b1") is None and len(queue) == 3
    assert queue.hold("c") is not None  # full
    assert queue.get() == "a1" and queue.get() == "b1" and queue.get(block=False) is None
    queue.fill("a", "a2")
    assert queue.get() == "a2" and len(queue) == 0
    assert queue.hold("a") is None
    queue.release("a")
    assert len(queue) == 0 and queue.put("a", "x") is None and queue.put("a", "y") is None

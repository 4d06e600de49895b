"""Constrained decoding wired into generation: a random tiny model, held to a schema, answers valid JSON.

The tiny model's weights are random, so any structure in its output comes from the
grammar alone: a broken mask, a missed advance or an EOS let through early shows up
as text that does not parse or validate.
"""
from __future__ import annotations

import json

import jsonschema  # the test extra's: an independent judge of the outputs
import pytest

import edgellm
from edgellm.errors import GenerationError
from edgellm.service import protocol as proto
from edgellm.service.broker import find_mosquitto
from mqtt_helpers import connection, load_schema, running_service, schema_errors

pytest.importorskip("llguidance", reason="constrained decoding needs the grammar extra")

SCHEMA = {
    "type": "object",
    "properties": {
        "severity": {"enum": ["low", "medium", "high", "critical"]},
        "machine": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                           "line": {"type": "string", "maxLength": 4}},
            "required": ["id", "line"],
            "additionalProperties": False,
        },
        "causes": {"type": "array", "items": {"enum": ["bearing", "belt", "motor"]}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["severity", "machine", "causes", "ok"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "report", "schema": SCHEMA, "strict": True}}
BUDGET = 160  # the tiny vocabulary spells most of the JSON a byte or two per token


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return edgellm.load(tiny_bundle)


def test_every_finished_output_validates_and_a_cut_one_says_so(model):
    finished = 0
    for seed in range(50):
        result = model.generate("Report:", response_format=FORMAT, temperature=1.0, seed=seed,
                                max_new_tokens=BUDGET)
        if result.incomplete:
            assert result.finish_reason == "length", (seed, result)
            with pytest.raises(ValueError):
                jsonschema.validate(json.loads(result.text), SCHEMA)
            continue
        assert result.finish_reason == "stop", (seed, result)
        jsonschema.validate(json.loads(result.text), SCHEMA)
        finished += 1
    assert finished >= 38, finished


def test_a_budget_that_runs_out_is_marked_incomplete(model):
    result = model.generate("Report:", response_format=FORMAT, temperature=1.0, seed=3, max_new_tokens=4)
    assert (result.finish_reason, result.incomplete) == ("length", True)
    assert result.text.startswith("{")
    chunks = list(model.stream("Report:", response_format=FORMAT, temperature=1.0, seed=3, max_new_tokens=4))
    assert chunks[-1].incomplete and not any(c.incomplete for c in chunks[:-1])
    assert model.generate("Report:", temperature=1.0, seed=3, max_new_tokens=4).incomplete is False


def test_greedy_asks_the_grammar_about_one_token_before_masking_them_all(model, monkeypatch):
    from edgellm.grammar import GrammarState

    masks = []
    mask = GrammarState.__call__
    monkeypatch.setattr(GrammarState, "__call__", lambda self, *a: masks.append(1) or mask(self, *a))
    fast = model.generate("Report:", response_format=FORMAT, max_new_tokens=BUDGET)
    masked_steps = len(masks)
    monkeypatch.setattr(GrammarState, "allows", lambda self, token: False)
    slow = model.generate("Report:", response_format=FORMAT, max_new_tokens=BUDGET)
    assert fast.token_ids == slow.token_ids and fast.incomplete == slow.incomplete
    assert len(masks) - masked_steps == fast.usage.completion_tokens  # the slow run masked every step
    assert masked_steps < fast.usage.completion_tokens  # the fast one skipped some


def test_same_seed_same_output_with_prefix_reuse(model):
    runs = [model.generate("Report:", response_format=FORMAT, temperature=1.0, seed=11, max_new_tokens=BUDGET)
            for _ in range(2)]
    assert runs[1].usage.cached_prompt_tokens > 0  # the second run reused the prompt's KV
    assert runs[0].text == runs[1].text and runs[0].token_ids == runs[1].token_ids
    other = model.generate("Report:", response_format=FORMAT, temperature=1.0, seed=12, max_new_tokens=BUDGET)
    assert other.text != runs[0].text


def test_json_object_and_grammars(model):
    for seed in range(3):
        result = model.generate("x", response_format={"type": "json_object"}, temperature=1.0, seed=seed,
                                max_new_tokens=BUDGET)
        if not result.incomplete:
            assert isinstance(json.loads(result.text), dict)
    regex = model.generate("x", grammar={"type": "regex", "value": "(yes|no) [0-9]{2}"}, temperature=1.0,
                           seed=1, max_new_tokens=20)
    assert regex.finish_reason == "stop" and not regex.incomplete
    assert regex.text[:3] in ("yes", "no ") and regex.text[-2:].isdigit(), regex.text
    lark = model.generate("x", grammar={"type": "lark", "value": 'start: "on" | "off"'}, temperature=1.0,
                          seed=2, max_new_tokens=10)
    assert lark.text in ("on", "off") and lark.finish_reason == "stop"


def test_bad_requests_are_refused_naming_the_path(model):
    bad = {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "required": ["tags"],
        "properties": {"tags": {"type": "array", "minItems": 5, "maxItems": 2}}}}}
    with pytest.raises(GenerationError, match=r"response_format\.json_schema\.schema\.properties\.tags"):
        model.generate("x", response_format=bad)
    with pytest.raises(GenerationError, match="stop cannot be combined with response_format"):
        model.generate("x", response_format={"type": "json_object"}, stop=["}"])
    with pytest.raises(GenerationError, match=r"^grammar\.type must be one of"):
        model.generate("x", grammar={"type": "json_object"})


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)")
@pytest.mark.timeout(60)
def test_mqtt_request_with_a_schema_gets_valid_json(broker, probe, model):
    topics = proto.Topics("edgellm", "dev1")
    with running_service(model, connection(broker.url)):
        probe.publish(topics.request, {"id": "j1", "prompt": "Report:", "response_format": FORMAT,
                                       "temperature": 1.0, "seed": 0, "max_tokens": BUDGET, "stream": False})
        final = probe.replies("j1")[-1]
        bad = {**FORMAT, "json_schema": {"schema": {"type": "object", "required": ["x"],
                                                    "properties": {"x": {"type": "nope"}}}}}
        probe.publish(topics.request, {"id": "j2", "prompt": "Report:", "response_format": bad})
        error = probe.replies("j2")[-1]
    assert schema_errors(final, load_schema("final")) == []
    assert final["finish_reason"] == "stop" and "incomplete" not in final, final
    jsonschema.validate(json.loads(final["text"]), SCHEMA)
    assert error["error"]["code"] == proto.BAD_REQUEST, error
    assert "response_format.json_schema.schema.properties.x" in error["error"]["message"], error

"""Tool-call arguments hold the declared parameters and no others, as OpenAI's strict mode:
objects are closed unless the schema says otherwise, nested ones too; and so is a strict
response_format. A JSON schema's own default is open, and llguidance follows it, so under the
old grammar a random model under tool_choice "required" wrote `{"valve": 7, "open": true, "...`
on 7 seeds of 12 (and ran out of budget inside the key), and SmolLM2 copied the schema's own
keywords ("type", "maximum") into the nested object.
"""
from __future__ import annotations

import json

import pytest

import edgellm
from edgellm.grammar import closed_objects, parse_response_format
from tests.tiny import QWEN3_TEMPLATE, THINK_TOOL_TOKENS

pytest.importorskip("llguidance", reason="tool calls are held to their schemas by the grammar extra")

# What a user writes: nothing says additionalProperties, at either level.
VALVE = {"type": "object", "properties": {
    "valve": {"type": "integer", "minimum": 1, "maximum": 99},
    "open": {"type": "boolean"},
    "at": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
           "required": ["hour"]}},
    "required": ["valve", "open", "at"]}
TOOLS = [{"type": "function", "function": {"name": "set_valve", "description": "Open or close a valve",
                                           "parameters": VALVE}}]
ASK = [{"role": "user", "content": "Open valve 3"}]


def declared_only(args: dict) -> None:
    assert set(args) <= set(VALVE["properties"]), args
    assert set(args.get("at", {})) <= {"hour"}, args


@pytest.fixture(scope="module")
def random_model(tiny_bundle_factory):
    return edgellm.load(tiny_bundle_factory("qwen3", added_tokens=THINK_TOOL_TOKENS, chat_template=QWEN3_TEMPLATE,
                                            max_position_embeddings=2048))


def test_a_random_model_writes_no_undeclared_key(random_model):
    for seed in range(8):
        result = random_model.generate(ASK, tools=TOOLS, tool_choice="required", reasoning="off", temperature=1.0,
                                       seed=seed, max_new_tokens=120, parallel_tool_calls=False)
        # An open object let it go on after the last key with one of its own, never closed in the budget.
        assert not result.incomplete and result.finish_reason == "tool_calls", result.text
        declared_only(json.loads(result.tool_calls[0]["function"]["arguments"]))


def test_a_strict_response_format_is_closed_too(random_model):
    strict = {"type": "json_schema", "json_schema": {"name": "valve", "schema": VALVE, "strict": True}}
    for seed in range(4):
        result = random_model.generate(ASK, response_format=strict, reasoning="off", temperature=1.0, seed=seed,
                                       max_new_tokens=120)
        assert not result.incomplete, result.text
        declared_only(json.loads(result.text))
    # Without strict, the schema means what JSON Schema says: other keys are allowed.
    loose = {"type": "json_schema", "json_schema": {"name": "valve", "schema": VALVE}}
    assert json.loads(parse_response_format(loose).source) == VALVE


def test_what_closing_leaves_open():
    given = {"type": "object", "properties": {
        "any": {"type": "object", "additionalProperties": True},
        "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"x": {}}}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"y": {}}}},
        "both": {"allOf": [{"type": "object", "properties": {"a": {}}}, {"properties": {"b": {}}}]},
        "named": {"type": "object", "required": ["z"]}},
        "$defs": {"d": {"properties": {"w": {}}}}}
    out = closed_objects(given)
    assert out["additionalProperties"] is False and "additionalProperties" not in given  # a copy
    p = out["properties"]
    assert p["any"]["additionalProperties"] is True
    assert p["map"]["additionalProperties"]["additionalProperties"] is False
    assert p["list"]["items"]["additionalProperties"] is False
    # allOf's parts describe one object together: closing one would refuse the other's keys.
    assert all("additionalProperties" not in part for part in p["both"]["allOf"]) and "additionalProperties" \
        not in p["both"]
    assert "additionalProperties" not in p["named"]  # closed, its required key could never be written
    assert out["$defs"]["d"]["additionalProperties"] is False


@pytest.mark.slow
def test_smollm2_calls_carry_only_declared_keys(smollm2_bundle):
    model = edgellm.load(smollm2_bundle)
    for seed in range(3):
        result = model.generate(ASK, tools=TOOLS, tool_choice="required", temperature=0.0 if seed == 0 else 0.8,
                                seed=seed, max_new_tokens=80, parallel_tool_calls=False)
        assert not result.incomplete and result.finish_reason == "tool_calls", result.text
        declared_only(json.loads(result.tool_calls[0]["function"]["arguments"]))

"""The parameter contract: one declaration, and every front agrees with it at every boundary.

Each value below goes through the four fronts: the Python API (GenerationParams.build),
the CLI (parse + sampling_params), the MQTT validator (parse_request) and the published
JSON Schema (checked by jsonschema, a second implementation). They must all accept it
or all refuse it, and agree with the expectation written here.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jsonschema  # the test extra's: a second, independent reading of the schema
import pytest

from edgellm.cli import main as cli
from edgellm.cli.args import DOCUMENT_FLAGS, sampling_params
from edgellm.errors import GenerationError, RequestError
from edgellm.params import (BOOL, BY_NAME, CHOICE, INT, LOGIT_BIAS, NUMBER, OBJECT, PARAMS, RETRIEVAL, STRING, STRINGS,
                            TOOL_CHOICE, TOOLS, GenerationParams, to_wire, wire_schema)
from edgellm.service import protocol as proto

SCHEMA_PATH = Path(proto.__file__).parent / "schemas" / "request.json"
# Logit-bias keys are checked against the vocabulary by the API and by digit count on
# the wire (no vocabulary there); a vocabulary of 10**9 makes both limits one.
VOCAB = 10**9


def api_accepts(name: str, value: Any) -> bool:
    if BY_NAME[name].kind == LOGIT_BIAS and isinstance(value, dict):
        # The API takes int keys; a key that is not ASCII digits stays a string and is refused.
        value = {int(k) if k.isascii() and k.isdigit() else k: v for k, v in value.items()}
    try:
        GenerationParams.build({}, {name: value}, VOCAB)
    except GenerationError:
        return False
    return True


def wire_accepts(wire: str, value: Any) -> bool:
    try:
        proto.parse_request(json.dumps({"id": "a", "prompt": "x", wire: value}).encode())
    except RequestError as exc:
        assert exc.code == proto.BAD_REQUEST and wire in str(exc), str(exc)
        return False
    return True


VALIDATOR = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def schema_accepts(wire: str, value: Any) -> bool:
    return VALIDATOR.is_valid({"id": "a", "prompt": "x", wire: value})


def cli_args(p, value: Any) -> list[str] | None:
    """The command line that passes `value`, or None when a command line cannot say it
    (every flag value is text: "1" and 1 read alike, and there is no true)."""
    if p.kind in (INT, NUMBER):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [f"{p.flag}={value!r}"] if number else None  # "=": argparse reads "-5e-324" as an option
    if isinstance(value, str):
        return [f"{p.flag}={value}"]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [f"{p.flag}={v}" for v in value]
    return None


def cli_accepts(args: list[str]) -> bool:
    try:
        ns = cli.build_parser().parse_args(["run", "bundle", "prompt", *args])
        sampling_params(ns)
    except (SystemExit, GenerationError):
        return False
    return True


def _around(bound: float) -> list[float]:
    return [math.nextafter(bound, -math.inf), float(bound), math.nextafter(bound, math.inf)]


def number_cases(p) -> list[tuple[Any, bool]]:
    """Values at and beside each bound, and a few wrong types; expected from the bounds."""
    values: list[Any] = []
    for bound in (p.low, p.high):
        if bound is None:
            continue
        if p.kind == INT:
            values += [int(bound) - 1, int(bound), int(bound) + 1, float(bound) + 0.5]
        else:
            values += _around(bound)
    if p.kind == INT:
        values += [float(p.low + 2), 10**30]  # 2.0 is an integer, as in JSON Schema
    else:
        values += [p.low + 1 if p.high is None else (p.low + p.high) / 2, 1e300]

    def ok(v: Any) -> bool:
        if p.kind == INT and not float(v).is_integer():
            return False
        if p.low is not None and (v < p.low or (p.low_open and v == p.low)):
            return False
        return p.high is None or not (v > p.high or (p.high_open and v == p.high))

    return [(v, ok(v)) for v in values] + [(True, False), ("1", False), ([1], False)]


STOP_CASES = [
    ("\n", True), ("x" * 128, True), ("x" * 129, False), ("", False),
    ([], True), (["a"] * 8, True), (["a"] * 9, False), ([""], False), (["x" * 129], False),
    ([1], False), (1, False), ({"a": 1}, False),
]
STRING_CASES = [("a", True), ("x" * 256, True), ("x" * 257, False), ("", False), (["a"], False), (1, False),
                ({"a": 1}, False)]
BIAS_CASES = [
    ({"0": -100}, True), ({"999999999": 100}, True), ({"7": 2.5, "12": -1}, True),
    ({"1000000000": 1}, False),  # ten digits
    ({"5": 100.5}, False), ({"5": -100.5}, False), ({"5": True}, False), ({"5": "1"}, False),
    ({"²": 1}, False), ({"-1": 1}, False), ({"the": 1}, False), ({"": 1}, False), ({" 5": 1}, False),
    ({str(i): 1 for i in range(300)}, True), ({str(i): 1 for i in range(301)}, False),
    ([1, 2], False), ("5", False),
]

_SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
# Shapes only: a schema that compiles to nothing is refused by the API and the wire, but
# the published JSON Schema cannot know (tests/test_structured.py covers those).
RESPONSE_FORMAT_CASES = [
    ({"type": "json_object"}, True), ({"type": "text"}, True),
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": _SCHEMA, "strict": True}}, True),
    ({"type": "json_schema", "json_schema": {"schema": _SCHEMA}}, True),
    ({"type": "json_schema"}, False), ({"type": "json_schema", "json_schema": {"name": "r"}}, False),
    ({"type": "json_schema", "json_schema": {"schema": _SCHEMA, "strict": "yes"}}, False),
    ({"type": "json_schema", "json_schema": {"schema": []}}, False),
    ({"type": "json_object", "extra": 1}, False), ({"type": "regex", "value": "a+"}, False),
    ({"type": "yaml"}, False), ({}, False), ("json_object", False), ([{"type": "json_object"}], False),
]
GRAMMAR_CASES = [
    ({"type": "regex", "value": "[a-z]+"}, True), ({"type": "lark", "value": "start: \"yes\" | \"no\""}, True),
    ({"type": "regex", "value": ""}, False), ({"type": "regex"}, False), ({"type": "regex", "value": 5}, False),
    ({"type": "json_object"}, False), ({"type": "lark", "value": "x", "flags": 1}, False), ("a+", False),
]
OBJECT_CASES = {"response_format": RESPONSE_FORMAT_CASES, "grammar": GRAMMAR_CASES}


def _tool(**function: Any) -> dict[str, Any]:
    return {"type": "function", "function": function}


# Shapes only, as for the constraints: a duplicate name or a "required" choice without
# tools needs the whole request (tests/test_tool_calls.py).
TOOLS_CASES = [
    ([], True), ([_tool(name="set_light")], True),
    ([_tool(name="set_light", description="on or off", parameters={"type": "object", "properties": {
        "on": {"type": "boolean"}}, "required": ["on"]}, strict=True)], True),
    ([_tool(name=f"t{i}") for i in range(64)], True), ([_tool(name=f"t{i}") for i in range(65)], False),
    ([_tool(name="set light")], False), ([_tool(name="x" * 65)], False), ([_tool(name="")], False),
    ([_tool(name="a", parameters={"type": "array"})], False), ([_tool(name="a", parameters=[])], False),
    ([_tool(name="a", extra=1)], False), ([_tool(name="a", strict="yes")], False),
    ([{"type": "retrieval", "function": {"name": "a"}}], False), ([{"type": "function"}], False),
    (_tool(name="a"), False), ("set_light", False),
]
TOOL_CHOICE_CASES = [
    ("auto", True), ("none", True), ("maybe", False), ("", False), (1, False),
    ({"type": "function"}, False), ({"type": "function", "function": {"name": 1}}, False),
]
RETRIEVAL_CASES = [
    ({"index": "manual"}, True), ({"index": "manual", "k": 1}, True), ({"index": "m", "k": 16}, True),
    ({"index": "m", "k": 2.0}, True), ({"index": "m", "k": 0}, False), ({"index": "m", "k": 17}, False),
    ({"index": "m", "k": True}, False), ({"index": ""}, False), ({"index": "x" * 1025}, False),
    ({"k": 3}, False), ({"index": "m", "top": 3}, False), ("manual", False), ([], False),
]
BOOL_CASES = [(True, True), (False, True), (1, False), (0, False), ("true", False)]
CHOICE_CASES = {"speculative": [("prompt_lookup", True), ("off", True), ("ngram", False), (1, False)],
                "reasoning": [("separate", True), ("hide", True), ("inline", True), ("off", True),
                              ("on", False), ("", False), (True, False), (1, False)]}


def cases() -> list[tuple[str, Any, bool]]:
    out = []
    for p in PARAMS:
        if p.wire is None and not p.cli:
            continue
        if p.kind in (INT, NUMBER):
            out += [(p.name, v, ok) for v, ok in number_cases(p)]
        elif p.kind == STRINGS:
            out += [(p.name, v, ok) for v, ok in STOP_CASES]
        elif p.kind == STRING:
            out += [(p.name, v, ok) for v, ok in STRING_CASES]
        elif p.kind == LOGIT_BIAS:
            out += [(p.name, v, ok) for v, ok in BIAS_CASES]
        elif p.kind == OBJECT:
            out += [(p.name, v, ok) for v, ok in OBJECT_CASES[p.name]]
        elif p.kind == TOOLS:
            out += [(p.name, v, ok) for v, ok in TOOLS_CASES]
        elif p.kind == TOOL_CHOICE:
            out += [(p.name, v, ok) for v, ok in TOOL_CHOICE_CASES]
        elif p.kind == CHOICE:
            out += [(p.name, v, ok) for v, ok in CHOICE_CASES[p.name]]
        elif p.kind == BOOL:
            out += [(p.name, v, ok) for v, ok in BOOL_CASES]
        elif p.kind == RETRIEVAL:
            out += [(p.name, v, ok) for v, ok in RETRIEVAL_CASES]
        else:
            raise AssertionError(f"{p.name}: add drift cases for kind {p.kind!r}")
    return out


# Cases written out by hand: the drift this test was written for.
KNOWN = [
    ("min_p", 1.0, False),  # the MQTT validator accepted it, the runtime refused it
    ("min_p", 0.999, True),
    ("penalty_window", 4, True),  # existed in sampling.py, but no front could set it
    ("penalty_window", 0, False),
    ("max_new_tokens", 1, True),
    ("max_new_tokens", 0, False),
    ("top_p", 0, False),
    ("top_p", 1, True),
    ("temperature", -0.1, False),
    ("logit_bias", {"²": 1}, False),  # str.isdigit() is true, int() raised
    ("seed", (1 << 63) - 1, True),
    ("seed", 1 << 63, False),
]


@pytest.mark.parametrize("name, value, expected", cases() + KNOWN,
                         ids=lambda v: json.dumps(v)[:40] if not isinstance(v, str) else v)
def test_every_front_agrees(name, value, expected):
    p = BY_NAME[name]
    got = {"api": api_accepts(name, value)}
    if p.wire:
        got["wire"] = wire_accepts(p.wire, value)
        got["schema"] = schema_accepts(p.wire, value)
    if p.cli and (args := cli_args(p, value)) is not None:
        got["cli"] = cli_accepts(args)
    assert got == {front: expected for front in got}, (name, value)


def test_every_exposed_parameter_is_exposed_everywhere_it_says():
    run_help = cli.build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    schema = json.loads(SCHEMA_PATH.read_text())
    for p in PARAMS:
        assert (p.flag in run_help) == p.cli or DOCUMENT_FLAGS.get(p.name, "-") in run_help, p.name
        assert (p.wire in schema["properties"]) if p.wire else p.name not in schema["properties"], p.name
    assert {p.wire for p in PARAMS if p.wire} <= proto.REQUEST_FIELDS
    assert "-n" in run_help and "--max-tokens" in run_help


def test_the_request_schema_file_is_what_the_declaration_generates():
    properties = json.loads(SCHEMA_PATH.read_text())["properties"]
    generated = wire_schema()
    lines = "\n".join(f"    {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in generated.items())
    assert {k: properties.get(k) for k in generated} == generated, \
        f"paste these properties into {SCHEMA_PATH}:\n{lines}"


def test_generation_params_fields_are_the_declaration():
    fields = [(f.name, f.default) for f in dataclasses.fields(GenerationParams)]
    assert fields == [(p.name, p.default) for p in PARAMS]


def test_the_same_parameters_arrive_from_every_front():
    """Names, renames and normalized values: a request says the same thing however it is sent."""
    wanted = {"max_new_tokens": 5, "temperature": 0.5, "top_k": 3, "penalty_window": 4, "stop": ["\n", "END"],
              "seed": 9, "min_p": 0.25}
    ns = cli.build_parser().parse_args(["run", "b", "p", "-n", "5", "--temperature", "0.5", "--top-k", "3.0",
                                        "--penalty-window", "4", "--stop", "\n", "--stop", "END", "--seed", "9",
                                        "--min-p", "0.25"])
    from_cli = sampling_params(ns)
    assert from_cli == wanted
    wire = to_wire(from_cli)
    assert wire["max_tokens"] == 5 and "max_new_tokens" not in wire
    request = proto.parse_request(json.dumps({"id": "a", "prompt": "x", **wire}).encode())
    assert request.params == wanted
    built = GenerationParams.build({}, request.params, VOCAB)
    assert (built.max_new_tokens, built.top_k, built.penalty_window, built.stop) == (5, 3, 4, ("\n", "END"))
    assert isinstance(built.top_k, int)
    bias = proto.parse_request(b'{"id": "a", "prompt": "x", "logit_bias": {"7": -100, "012": 1}}').params
    assert bias == {"logit_bias": {7: -100.0, 12: 1.0}}
    assert to_wire(bias) == {"logit_bias": {"7": -100.0, "12": 1.0}}


def test_errors_name_the_field_as_each_front_spells_it():
    with pytest.raises(RequestError, match="^max_tokens must be an integer >= 1, got 0$"):
        proto.parse_request(b'{"id": "a", "prompt": "x", "max_tokens": 0}')
    with pytest.raises(GenerationError, match="^max_new_tokens must be an integer >= 1, got 0$"):
        GenerationParams.build({}, {"max_new_tokens": 0}, VOCAB)
    with pytest.raises(RequestError, match="logit_bias key must be a token id of 1-9 digits, got '²'"):
        proto.parse_request('{"id": "a", "prompt": "x", "logit_bias": {"²": 1}}'.encode())
    with pytest.raises(GenerationError, match="logit_bias key must be a token id >= 0 and < 50, got 50"):
        GenerationParams.build({}, {"logit_bias": {50: 1}}, 50)
    with pytest.raises(GenerationError, match="cannot be sent over MQTT"):
        to_wire({"ignore_eos": True})
    with pytest.raises(RequestError, match="^stop cannot be combined with response_format"):
        proto.parse_request(b'{"id": "a", "prompt": "x", "stop": "}", "response_format": {"type": "json_object"}}')
    with pytest.raises(GenerationError, match="^response_format and grammar cannot both be set"):
        GenerationParams.build({}, {"response_format": {"type": "json_object"},
                                    "grammar": {"type": "regex", "value": "a"}}, VOCAB)


def test_a_constraint_goes_over_the_wire_and_back():
    schema = {"type": "json_schema", "json_schema": {"name": "r", "schema": _SCHEMA}}
    request = proto.parse_request(json.dumps({"id": "a", "prompt": "x", "response_format": schema}).encode())
    spec = request.params["response_format"]
    assert GenerationParams.build({}, request.params, VOCAB).response_format is spec  # compiled once, not again
    again = proto.parse_request(json.dumps({"id": "a", "prompt": "x", **to_wire(request.params)}).encode())
    assert again.params["response_format"] == spec
    grammar = proto.parse_request(b'{"id": "a", "prompt": "x", "grammar": {"type": "regex", "value": "a+"}}')
    assert to_wire(grammar.params) == {"grammar": {"type": "regex", "value": "a+"}}
    # A bundle's default stop strings give way to a constraint instead of refusing it.
    built = GenerationParams.build({"stop": ["\n"]}, {"response_format": {"type": "json_object"}}, VOCAB)
    assert built.stop == () and built.response_format is not None


def test_the_command_line_names_a_refused_value_by_its_flag():
    """Each front spells the field an error carries its own way; the command line as its flags."""
    args = cli.build_parser().parse_args(["run", "bundle", "prompt", "--max-tokens=0"])
    with pytest.raises(GenerationError, match="^--max-tokens must be an integer >= 1, got 0$") as refused:
        sampling_params(args)
    assert refused.value.field == "max_new_tokens"

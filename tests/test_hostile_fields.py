"""What params.py, grammar.py and tools.py parse from a request gives a 400 naming the field,
never a 500 (issue 19, item 6): deep schemas, numbers past float's range or past what Python
prints, lone surrogates, tool-call arguments nested 100,000 deep.
"""
from __future__ import annotations

from typing import Any

import pytest

from edgellm.errors import GenerationError
from edgellm.params import GenerationParams, from_wire
from edgellm.messages import check_messages
from edgellm.tools import parse_tools


def _deep(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("wire, message", [
    # llguidance read 128 levels at most, and raised ValueError.
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": _deep(300)}}},
     r"^response_format\.json_schema\.schema is nested deeper than 64 levels, the limit$"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": _deep(450)}}]},
     r"^tools\[0\]\.function\.parameters is nested deeper than 64 levels"),
    # float() of 10**400 raised OverflowError.
    ({"temperature": 10**400}, r"^temperature must be a number >= 0, got an integer of 401 digits$"),
    ({"logit_bias": {"5": -(10**400)}}, r"^logit_bias\[5\] must be a number in \[-100, 100\], got an integer of "
                                        r"401 digits$"),
    ({"grammar": {"type": "regex", "value": "a\ud800"}}, r"^grammar\.value holds a lone surrogate"),
])
def test_hostile_fields_are_refused_naming_them(wire, message):
    with pytest.raises(GenerationError, match=message):
        from_wire(wire)


def test_numbers_past_what_python_prints_are_refused_naming_the_field():
    """repr() of an integer over 4,300 digits raises ValueError: the message said it instead."""
    with pytest.raises(GenerationError, match=r"^temperature must be a number >= 0, got an integer of 5001 digits$"):
        GenerationParams.build({}, {"temperature": 10**5000}, 50)
    with pytest.raises(GenerationError, match=r"^seed must be an integer in \[0, \d+\], got an integer of 5001 digits$"):
        GenerationParams.build({}, {"seed": 10**5000}, 50)


@pytest.mark.parametrize("messages, message", [
    # The tokenizer raised TypeError on the worker, after the request had waited its turn.
    ([{"role": "user", "content": "hi \ud800"}], r"^messages\[0\]\.content holds a lone surrogate"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"city": "\\udfff"}'}}]}],
     r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments\.city holds a lone surrogate"),
    # RecursionError.
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000}}]}],
     r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON: arrays and objects nest"),
])
def test_messages_that_no_tokenizer_takes_are_refused_at_the_message_check(messages, message):
    with pytest.raises(GenerationError, match=message):
        check_messages(messages)


def test_a_lone_surrogate_is_refused_before_the_worker(model):
    with pytest.raises(GenerationError, match=r"^messages\[0\]\.content holds a lone surrogate"):
        model.generate([{"role": "user", "content": "\ud800"}], max_new_tokens=2)


def test_a_tool_that_no_tokenizer_takes_is_refused_naming_the_field():
    with pytest.raises(GenerationError, match=r"^tools\[0\]\.function\.description holds a lone surrogate"):
        parse_tools([{"type": "function", "function": {"name": "f", "description": "on \udc00"}}])


def test_a_lone_surrogate_in_a_python_api_prompt_is_a_generation_error(model):
    """The Python API has no wire check before it: the tokenizer's TypeError becomes the one-line
    GenerationError every other bad prompt raises."""
    with pytest.raises(GenerationError, match="lone surrogate"):
        model.generate("valve \ud800 open?", max_new_tokens=2)
    assert model.generate("valve open?", max_new_tokens=2, temperature=0).usage.completion_tokens == 2

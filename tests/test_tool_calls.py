"""Tool calls and reasoning end to end, on a tiny random model shaped like Qwen3: think markers
and tool-call tags in its vocabulary, a chat template that renders tools and drops old thinking.

Its weights are random, so every call that validates does so because of the grammar, and
every channel split because of the think-marker tokens.
"""
from __future__ import annotations

import json
import subprocess
import sys

import jsonschema  # the test extra's: an independent judge of the arguments
import pytest

import edgellm
from edgellm.errors import GenerationError
from edgellm.service import protocol as proto
from edgellm.service.broker import find_mosquitto
from edgellm.tools import merge_deltas
from mqtt_helpers import connection, load_schema, running_service, schema_errors
from tests.tiny import QWEN3_TEMPLATE, THINK_TOOL_TOKENS

pytest.importorskip("llguidance", reason="tool calls are held to their schemas by the grammar extra")

THERMOSTAT = {"type": "object", "properties": {
    "room": {"enum": ["kitchen", "hall", "office"]},
    "celsius": {"type": "number", "minimum": 5, "maximum": 30},
    "schedule": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3}},
    "required": ["room", "celsius"], "additionalProperties": False}
LIGHT = {"type": "object", "properties": {"on": {"type": "boolean"}, "level": {"type": "integer", "minimum": 0,
                                                                              "maximum": 100}},
         "required": ["on"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "set_thermostat", "description": "Set a room's heating",
                                           "parameters": THERMOSTAT}},
         {"type": "function", "function": {"name": "set_light", "parameters": LIGHT}}]
SCHEMAS = {"set_thermostat": THERMOSTAT, "set_light": LIGHT}
ASK = [{"role": "user", "content": "Make the kitchen warmer."}]
BUDGET = 400  # with parallel calls a random model goes on calling while "\n" beats EOS


@pytest.fixture(scope="module")
def model(tiny_bundle_factory):
    # Byte-level merges of a tiny corpus spell the tools prompt in about a thousand tokens.
    return edgellm.load(tiny_bundle_factory("qwen3", added_tokens=THINK_TOOL_TOKENS, chat_template=QWEN3_TEMPLATE,
                                            max_position_embeddings=2048))


def check_calls(result, names=tuple(SCHEMAS)) -> None:
    """Every call names an offered function and its arguments validate."""
    assert result.finish_reason == "tool_calls" and result.tool_calls, result
    for call in result.tool_calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_the_conventions_come_from_the_bundle(model):
    markers = model.conventions.markers
    assert markers is not None and (markers.start, markers.end) == ("<think>", "</think>")
    assert model.conventions.syntax == "hermes"


def test_required_and_named_calls_always_validate(model):
    done = 0
    for seed in range(12):
        named = seed % 2 == 1
        choice = {"type": "function", "function": {"name": "set_light"}} if named else "required"
        result = model.generate(ASK, tools=TOOLS, tool_choice=choice, reasoning="off", temperature=1.0,
                                seed=seed, max_new_tokens=BUDGET, parallel_tool_calls=seed % 3 != 0)
        if result.incomplete:  # the budget ran out inside a call: said so; only finished calls come back
            assert result.finish_reason == "length"
            result.finish_reason = "tool_calls" if result.tool_calls else "length"
            if not result.tool_calls:
                continue
        check_calls(result, ("set_light",) if named else tuple(SCHEMAS))
        if not result.incomplete:
            assert result.text == ""
            done += 1
    assert done >= 6, done


def test_auto_leaves_text_free_and_holds_an_opened_call(model):
    for seed in range(6):
        result = model.generate(ASK, tools=TOOLS, reasoning="off", temperature=1.0, seed=seed, max_new_tokens=40)
        if result.tool_calls:
            check_calls(result)
        else:
            assert result.finish_reason in ("stop", "length")
    # A model that opens a call (forced here by a bias on the tag) finishes it under the schema.
    open_tag = model.tokenizer.token_to_id("<tool_call>")
    result = model.generate(ASK, tools=TOOLS, reasoning="off", temperature=1.0, seed=1, max_new_tokens=BUDGET,
                            logit_bias={open_tag: 30})
    if not result.incomplete:
        check_calls(result)


def a_finished_call(model, **params) -> tuple[dict, object]:
    """Parameters under which the random model finishes its call within the budget, and the result."""
    for seed in range(20):
        chosen = dict(tools=TOOLS, tool_choice="required", reasoning="off", temperature=1.0, seed=seed,
                      max_new_tokens=BUDGET, parallel_tool_calls=False, **params)
        result = model.generate(ASK, **chosen)
        if result.finish_reason == "tool_calls" and not result.incomplete:
            return chosen, result
    raise AssertionError("no seed of 20 finished its call")


def test_calls_stream_as_openai_deltas(model):
    params, whole = a_finished_call(model)
    chunks = list(model.stream(ASK, **params))
    deltas = [d for c in chunks for d in c.tool_calls]
    assert deltas and deltas[0]["function"]["arguments"] == "" and deltas[0]["function"]["name"]
    streamed = merge_deltas([], deltas)
    assert [c["function"] for c in streamed] == [c["function"] for c in whole.tool_calls]
    assert chunks[-1].finish_reason == whole.finish_reason == "tool_calls"


def test_the_tool_result_round_trip_renders(model):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "set_thermostat", "arguments": '{"room": "kitchen", "celsius": 22}'}}
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": '{"ok": true}'}]
    params = edgellm.GenerationParams.build({}, {"tools": TOOLS, "reasoning": "off"}, model.spec.vocab_size)
    prompt = model.tokenizer.decode(model.prompt_ids(history, params), skip_special_tokens=False)
    assert '<tool_call>\n{"name": "set_thermostat", "arguments": {"room": "kitchen", "celsius": 22}}\n</tool_call>' \
        in prompt
    assert '<tool_response>\n{"ok": true}\n</tool_response>' in prompt and '"name": "set_light"' in prompt
    result = model.generate(history, tools=TOOLS, reasoning="off", max_new_tokens=8)
    assert result.usage.prompt_tokens == len(model.prompt_ids(history, params))


def test_bad_tool_requests_name_their_path(model):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "nope"}}}}}]
    with pytest.raises(GenerationError, match=r"tools\[0\]\.function\.parameters\.properties\.n"):
        model.generate(ASK, tools=bad)
    with pytest.raises(GenerationError, match="tool_choice.function.name 'nope' is not one of the tools"):
        model.generate(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(GenerationError, match="tools need chat messages"):
        model.generate("plain prompt", tools=TOOLS)
    with pytest.raises(GenerationError, match="stop cannot be combined with tool_choice"):
        model.generate(ASK, tools=TOOLS, tool_choice="required", stop=["x"])


# -- reasoning on a model whose vocabulary has think markers -------------------------------

def opened(model) -> list[int]:
    """A prompt whose generation header opens the block, as a DeepSeek-R1 distill's does."""
    return model.encode(model.render_chat(ASK) + "<think>\n")


def test_reasoning_modes_and_budget(model):
    end = model.conventions.markers.end_id
    base = dict(temperature=1.0, seed=5, max_new_tokens=16, max_reasoning_tokens=5)
    separate = model.generate(opened(model), **base)
    assert separate.usage.reasoning_tokens == 5 and separate.token_ids[5] == end
    assert separate.reasoning and "</think>" not in separate.reasoning + separate.text
    assert separate.reasoning == model.tokenizer.decode(separate.token_ids[:5]).strip()
    hidden = model.generate(opened(model), **base, reasoning="hide")
    assert hidden.token_ids == separate.token_ids  # the same tokens, only the channels differ
    assert (hidden.reasoning, hidden.text) == ("", separate.text)
    inline = model.generate(opened(model), **base, reasoning="inline")
    assert inline.reasoning == "" and inline.text == model.tokenizer.decode(separate.token_ids)
    assert "</think>" in inline.text
    streamed = list(model.stream(opened(model), **base))
    assert "".join(c.reasoning for c in streamed) == separate.reasoning


def test_off_renders_an_empty_block_and_opens_none(model):
    params = edgellm.GenerationParams.build({}, {"reasoning": "off"}, model.spec.vocab_size)
    prompt = model.tokenizer.decode(model.prompt_ids(ASK, params), skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    start = model.conventions.markers.start_id
    for seed in range(3):
        result = model.generate(ASK, reasoning="off", temperature=1.0, seed=seed, max_new_tokens=8,
                                logit_bias={start: 50})
        assert not {start, model.conventions.markers.end_id} & set(result.token_ids) and result.reasoning == ""


def test_schema_and_calls_hold_only_after_reasoning(model):
    result = model.generate(opened(model), response_format={"type": "json_object"}, temperature=1.0, seed=2,
                            max_reasoning_tokens=4, max_new_tokens=BUDGET)
    assert result.usage.reasoning_tokens == 4 and result.reasoning
    if not result.incomplete:
        assert isinstance(json.loads(result.text), dict)
    start = model.conventions.markers.start_id
    for seed in range(3):  # the bias opens the block; the schemas have no free text for "<think>" to hide in
        result = model.generate(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                                max_reasoning_tokens=3, max_new_tokens=BUDGET, logit_bias={start: 50})
        assert result.usage.reasoning_tokens == 3 and result.token_ids[0] == start
        if not result.incomplete:
            check_calls(result)


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)")
@pytest.mark.timeout(90)
def test_mqtt_carries_tool_calls_and_reasoning(broker, probe, model):
    topics = proto.Topics("edgellm", "dev1")
    audit = "plant/audit/reasoning"
    params, _ = a_finished_call(model)
    with running_service(model, connection(broker.url), reasoning_topic=audit):
        probe.publish(topics.request, {"id": "c1", "messages": ASK, "tools": TOOLS, "tool_choice": "required",
                                       "reasoning": "off", "temperature": 1.0, "seed": params["seed"],
                                       "max_tokens": BUDGET, "parallel_tool_calls": False})
        calls = probe.replies("c1", timeout=30)
        history = ASK + [{"role": "assistant", "content": None, "tool_calls": calls[-1]["tool_calls"]},
                         {"role": "tool", "tool_call_id": calls[-1]["tool_calls"][0]["id"], "content": "done"}]
        probe.publish(topics.request, {"id": "c2", "messages": history, "tools": TOOLS, "reasoning": "off",
                                       "max_tokens": 4})
        round_trip = probe.replies("c2", timeout=30)[-1]
        probe.publish(topics.request, {"id": "r1", "prompt": model.render_chat(ASK) + "<think>\n",
                                       "max_reasoning_tokens": 3, "max_tokens": 10, "seed": 1,
                                       "temperature": 1.0})
        thought = probe.replies("r1", timeout=30)
        logged = probe.wait(lambda m: m.topic == audit, timeout=10)
        probe.publish(topics.request, {"id": "b1", "messages": ASK, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}]})
        bad = probe.replies("b1")[-1]
    final = calls[-1]
    assert schema_errors(final, load_schema("final")) == [] and final["finish_reason"] == "tool_calls", final
    for chunk in calls[:-1]:
        assert schema_errors(chunk, load_schema("chunk")) == []
    assert merge_deltas([], [d for c in calls[:-1] for d in c.get("tool_calls", [])]) == final["tool_calls"]
    for call in final["tool_calls"]:
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    assert round_trip["done"] and schema_errors(round_trip, load_schema("final")) == []
    assert thought[-1]["usage"]["reasoning_tokens"] == 3 and thought[-1]["reasoning"]
    assert "".join(c.get("reasoning", "") for c in thought[:-1]) == thought[-1]["reasoning"]
    assert json.loads(logged.payload) == {"id": "r1", "reply_topic": topics.response("r1"),
                                          "reasoning": thought[-1]["reasoning"], "finish_reason": "length"}
    assert bad["error"]["code"] == proto.BAD_REQUEST and "tools[0].function.parameters" in bad["error"]["message"]


# -- the command line ----------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True, timeout=300)


def test_the_command_line_takes_schemas_and_tools_from_files(model, tmp_path):
    tools, schema = tmp_path / "tools.json", tmp_path / "report.json"
    tools.write_text(json.dumps(TOOLS))
    report = {"type": "object", "properties": {"severity": {"enum": ["low", "high"]}, "ok": {"type": "boolean"}},
              "required": ["severity", "ok"], "additionalProperties": False}
    schema.write_text(json.dumps(report))
    bundle, ask = str(model.path), ASK[0]["content"]
    seed = next(s for s in range(20) if model.generate(ASK, tools=TOOLS, tool_choice="required", reasoning="off",
                                                       temperature=1.0, seed=s, max_new_tokens=BUDGET).finish_reason
                == "tool_calls")
    expected = model.generate(ASK, tools=TOOLS, tool_choice="required", reasoning="off", temperature=1.0, seed=seed,
                              max_new_tokens=BUDGET)
    res = _cli("run", bundle, ask, "--tools", str(tools), "--tool-choice", "required", "--reasoning", "off",
               "-n", str(BUDGET), "--temperature", "1.0", "--seed", str(seed))
    assert res.returncode == 0, res.stderr
    printed = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert [c["function"] for c in printed] == [c["function"] for c in expected.tool_calls]
    assert "[tool_calls]" in res.stderr

    res = _cli("run", bundle, ask, "--json-schema", str(schema), "--reasoning", "off", "-n", "60")
    assert res.returncode == 0, res.stderr
    jsonschema.validate(json.loads(res.stdout), report)

    res = _cli("run", bundle, model.render_chat(ASK) + "<think>\n", "--raw", "--max-reasoning-tokens", "3",
               "-n", "8", "--temperature", "1.0", "--seed", "1")
    assert res.returncode == 0 and res.stderr.startswith("[reasoning] "), res.stderr
    assert "</think>" not in res.stdout

    for args, message in [(("--tools", str(tmp_path / "none.json")), "--tools"),
                          (("--json-schema", str(schema), "--stop", "x"), "--stop cannot be combined with --json-schema"),
                          (("--tools", str(tools), "--tool-choice", "unknown_tool"), "'unknown_tool' is not one of")]:
        res = _cli("run", bundle, ask, *args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and message in lines[0], res.stderr

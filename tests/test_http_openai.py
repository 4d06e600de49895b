"""The OpenAI routes, with the real `openai` package as the client against a real uvicorn.

The tiny model is random, so every check compares with what the Python API generates
for the same parameters (greedy, or seeded), or validates against a schema.
"""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from edgellm.tools import merge_deltas
from http_helpers import LIGHT, TOOLS, load_qwen3, serving

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(model):
    with serving(model) as server:
        yield openai_client(server)


def test_whole_chat_completion_is_the_api_answer(client, model):
    expected = model.generate(ASK, max_new_tokens=12, seed=3, temperature=0.8, top_p=0.9)
    reply = client.chat.completions.create(model=model.manifest.name, messages=ASK, max_tokens=12, seed=3,
                                           temperature=0.8, top_p=0.9)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.object == "chat.completion" and reply.model == model.manifest.name
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
    assert reply.usage.total_tokens == expected.usage.prompt_tokens + expected.usage.completion_tokens


def test_streamed_chat_completion_with_usage(client, model):
    expected = model.generate(ASK, max_new_tokens=10)
    chunks = list(client.chat.completions.create(model=model.manifest.name, messages=ASK,
                                                 max_completion_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


def test_text_completions_whole_and_streamed(client, model):
    expected = model.generate("Once upon a time", max_new_tokens=8)
    whole = client.completions.create(model=model.manifest.name, prompt="Once upon a time", max_tokens=8)
    assert whole.choices[0].text == expected.text and whole.usage.completion_tokens == 8
    streamed = client.completions.create(model=model.manifest.name, prompt="Once upon a time", max_tokens=8,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_models_lists_the_served_model(client, model):
    assert [m.id for m in client.models.list().data] == [model.manifest.name]
    assert client.models.retrieve(model.manifest.name).id == model.manifest.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_the_bundle_folders_name_is_accepted_as_the_model_id(client, model):
    """People type the folder they exported to (`bundles/smollm2-135m` -> `smollm2-135m`); it
    names the one served model, whose id stays the manifest's name in every reply."""
    folder = model.path.name
    assert folder != model.manifest.name  # else this test proves nothing
    assert client.models.retrieve(folder).id == model.manifest.name
    reply = client.chat.completions.create(model=folder, messages=ASK, max_tokens=2)
    assert reply.model == model.manifest.name


def test_response_format_json_schema_holds(client, model):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = client.chat.completions.create(
        model=model.manifest.name, messages=ASK, max_tokens=64, temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert reply.choices[0].finish_reason == "stop", reply
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_errors_raise_the_openai_exception_classes(client, model):
    name = model.manifest.name
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="llama3", messages=ASK)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=name, messages=ASK, temperature=-1)
    assert bad.value.param == "temperature" and "temperature" in bad.value.message
    with pytest.raises(openai.BadRequestError) as many:
        client.chat.completions.create(model=name, messages=ASK, n=2)
    assert many.value.param == "n"
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "word " * 2000}])
    assert long.value.code == "context_length_exceeded"
    # Short enough in bytes to be queued, too long once tokenized (one- and two-byte tokens):
    # refused by the worker, with the same code.
    with pytest.raises(openai.BadRequestError) as tokenized:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": " x" * (model.max_context + 8)}])
    assert tokenized.value.code == "context_length_exceeded" and "tokens, context is" in tokenized.value.message
    with pytest.raises(openai.BadRequestError) as ceiling:
        client.chat.completions.create(model=name, messages=ASK, max_tokens=5000)
    assert "at most 1024" in ceiling.value.message
    # the server keeps serving
    assert client.chat.completions.create(model=name, messages=ASK, max_tokens=2).choices[0].message.content


@pytest.fixture(scope="module")
def qwen3(tiny_bundle_factory):
    return load_qwen3(tiny_bundle_factory)


def test_tool_calls_whole_and_as_streamed_deltas(qwen3):
    pytest.importorskip("llguidance")
    ask = [{"role": "user", "content": "Turn the light on."}]
    params = dict(tools=TOOLS, tool_choice="required", temperature=1.0, max_tokens=200, parallel_tool_calls=False,
                  extra_body={"reasoning": "off"})
    with serving(qwen3) as server:
        client = openai_client(server)
        for seed in range(10):  # a random model finishes its call within the budget for most seeds
            whole = client.chat.completions.create(model=qwen3.manifest.name, messages=ask, seed=seed, **params)
            if whole.choices[0].finish_reason == "tool_calls":
                break
        assert whole.choices[0].finish_reason == "tool_calls", whole
        calls = whole.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].function.name == "set_light" and calls[0].id.startswith("call_")
        jsonschema.validate(json.loads(calls[0].function.arguments), LIGHT)
        chunks = list(client.chat.completions.create(model=qwen3.manifest.name, messages=ask, seed=seed,
                                                     stream=True, **params))
        deltas = [d.model_dump(exclude_none=True) for c in chunks for d in c.choices[0].delta.tool_calls or []]
        assert merge_deltas([], deltas)[0]["function"] == calls[0].function.model_dump()
        # As OpenAI streams a call: one delta a chunk, so a client reading `tool_calls[0]` of each
        # chunk, by index, gets all of it; the name (and id) first; the finish reason on its own.
        tool_chunks = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
        assert all(len(entries) == 1 for entries in tool_chunks)
        head = tool_chunks[0][0]
        assert (head.index, head.type, head.function.name) == (0, "function", "set_light")
        assert head.id.startswith("call_") and head.function.arguments == ""
        read: dict[int, str] = {}
        for entries in tool_chunks:
            read[entries[0].index] = read.get(entries[0].index, "") + (entries[0].function.arguments or "")
        assert read == {0: calls[0].function.arguments}
        last = chunks[-1].choices[0]
        assert last.finish_reason == "tool_calls" and not last.delta.tool_calls and not last.delta.content
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
        # the call's result goes back as a tool message
        history = ask + [whole.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": calls[0].id, "content": "the light is on"}]
        after = client.chat.completions.create(model=qwen3.manifest.name, messages=history, tools=TOOLS,
                                               max_tokens=4, extra_body={"reasoning": "off"})
        assert after.usage.prompt_tokens > whole.usage.prompt_tokens


def test_reasoning_goes_to_reasoning_content(qwen3):
    start = qwen3.conventions.markers.start_id
    ask = [{"role": "user", "content": "Why is the sky blue?"}]
    with serving(qwen3) as server:
        client = openai_client(server)
        reply = client.chat.completions.create(model=qwen3.manifest.name, messages=ask, max_tokens=12, seed=1,
                                               temperature=1.0, logit_bias={str(start): 50},
                                               extra_body={"max_reasoning_tokens": 3})
        streamed = list(client.chat.completions.create(model=qwen3.manifest.name, messages=ask, max_tokens=12,
                                                       seed=1, temperature=1.0, logit_bias={str(start): 50},
                                                       stream=True, extra_body={"max_reasoning_tokens": 3}))
    expected = qwen3.generate(ask, max_new_tokens=12, seed=1, temperature=1.0, logit_bias={start: 50},
                              max_reasoning_tokens=3)
    message = reply.choices[0].message
    thinking = message.model_extra["reasoning_content"]
    assert thinking == expected.reasoning and expected.reasoning and (message.content or "") == expected.text
    assert "</think>" not in (message.content or "")
    assert reply.usage.completion_tokens_details.reasoning_tokens == 3
    assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in streamed) == thinking

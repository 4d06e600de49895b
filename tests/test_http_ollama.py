"""The Ollama subset, with the real `ollama` package as the client against a real uvicorn."""
from __future__ import annotations

import json

import jsonschema
import ollama
import pytest

from http_helpers import LIGHT, TOOLS, load_qwen3, serving

ASK = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(model):
    with serving(model) as server:
        yield ollama.Client(host=server.url, timeout=60)


def tag(model) -> str:
    return f"{model.manifest.name}:latest"


def test_chat_streamed_and_whole_with_options(client, model):
    expected = model.generate(ASK, max_new_tokens=9, seed=4, temperature=0.7, top_k=20, repetition_penalty=1.1)
    options = {"num_predict": 9, "seed": 4, "temperature": 0.7, "top_k": 20, "repeat_penalty": 1.1,
               "num_ctx": 8192}  # Home Assistant's default num_ctx, above the loaded context: ignored
    whole = client.chat(model=tag(model), messages=ASK, options=options, stream=False, keep_alive=-1)
    assert whole.message.content == expected.text and whole.done and whole.done_reason == "length"
    assert whole.eval_count == 9 and whole.prompt_eval_count == expected.usage.prompt_tokens
    parts = list(client.chat(model=model.manifest.name, messages=ASK, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == expected.text
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count == 9


def test_generate_raw_and_templated(client, model):
    raw = client.generate(model=tag(model), prompt="Once upon", raw=True, options={"num_predict": 5}, stream=False)
    assert raw.response == model.generate("Once upon", max_new_tokens=5).text
    chat = client.generate(model=tag(model), prompt="Hello there", options={"num_predict": 5}, stream=False)
    assert chat.response == model.generate(ASK, max_new_tokens=5).text
    streamed = client.generate(model=tag(model), prompt="Hello there", options={"num_predict": 5},
                               stream=True)
    assert "".join(p.response for p in streamed) == chat.response
    assert client.generate(model=tag(model), prompt="").done_reason == "load"


def test_format_schema_holds(client, model):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = client.chat(model=tag(model), messages=ASK, format=schema, stream=True,
                        options={"num_predict": 64, "seed": 1, "temperature": 1.0})
    text = "".join(p.message.content for p in reply)
    jsonschema.validate(json.loads(text), schema)
    as_json = client.chat(model=tag(model), messages=ASK, format="json", options={"num_predict": 64, "seed": 2},
                          stream=False)
    if as_json.done_reason == "stop":
        assert isinstance(json.loads(as_json.message.content), dict)


def test_tags_ps_version_show(client, model):
    listed = client.list().models
    assert [m.model for m in listed] == [tag(model)] and listed[0].size > 0
    assert listed[0].details.family == model.manifest.spec.arch
    assert [m.model for m in client.ps().models] == [tag(model)]
    assert client.show(tag(model)).template == model.template.source
    assert client.show(f"{model.path.name}:latest").template == model.template.source  # the folder's name too
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="llama3.2:latest", messages=ASK, stream=False)
    assert unknown.value.status_code == 404 and "not found" in unknown.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        client.chat(model=tag(model), messages=ASK, options={"temperature": -1}, stream=False)
    assert bad.value.status_code == 400 and "options.temperature" in bad.value.error


def test_tools_and_think(tiny_bundle_factory):
    pytest.importorskip("llguidance")
    qwen3 = load_qwen3(tiny_bundle_factory)
    ask = [{"role": "user", "content": "Turn the light on."}]
    with serving(qwen3) as server:
        client = ollama.Client(host=server.url, timeout=60)
        assert {"tools", "thinking"} <= set(client.show(qwen3.manifest.name).capabilities)
        # Ollama has no tool_choice: with auto, the random model calls within a few seeds (held to the schema)
        for seed in range(20):
            parts = list(client.chat(model=qwen3.manifest.name, messages=ask, tools=TOOLS, think=False, stream=True,
                                     options={"seed": seed, "temperature": 1.0, "num_predict": 120}))
            calls = [c for p in parts for c in p.message.tool_calls or []]
            if calls:
                break
        assert calls and calls[0].function.name == "set_light", parts
        jsonschema.validate(dict(calls[0].function.arguments), LIGHT)
        assert not any(p.message.thinking for p in parts)
        history = ask + [{"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
                         {"role": "tool", "content": "the light is on", "tool_name": "set_light"}]
        after = client.chat(model=qwen3.manifest.name, messages=history, tools=TOOLS, think=False, stream=False,
                            options={"num_predict": 3})
        assert after.done and after.prompt_eval_count > 0
        # a prompt whose generation header opens the think block, as a DeepSeek-R1 distill's does
        opened = qwen3.render_chat(ask) + "<think>\n"
        thought = client.generate(model=qwen3.manifest.name, prompt=opened, raw=True, think=True, stream=False,
                                  options={"num_predict": 12, "seed": 1, "temperature": 1.0})
    expected = qwen3.generate(opened, max_new_tokens=12, seed=1, temperature=1.0)
    assert expected.reasoning and (thought.thinking, thought.response) == (expected.reasoning, expected.text)


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_refused_once_compiled_is_named_as_format(client, model, stream):
    """The schema is checked on the grammar thread after the request is accepted; its error still
    names Ollama's `format`, not the OpenAI-shaped field the parameters are declared under."""
    schema = {"type": "object", "properties": {"a": {"type": "array", "minItems": 5, "maxItems": 2}}, "required": ["a"]}
    with pytest.raises(ollama.ResponseError) as caught:
        reply = client.chat(model=tag(model), messages=[{"role": "user", "content": "hi"}], format=schema,
                            stream=stream)
        if stream:
            list(reply)
    assert caught.value.status_code == 400
    assert caught.value.error.startswith("format.properties.a"), caught.value.error
    assert "response_format" not in caught.value.error

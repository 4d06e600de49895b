"""Client calls the test suite never makes, against `edgellm serve BUNDLE --http`: issue 11's second bar.

    python benchmarks/http_clients.py BUNDLE [--json out.json]

The real SmolLM2 (or any bundle) in a `serve --http` process of its own; the `openai` and
`ollama` packages call it the way applications do, with parameter mixes, follow-up turns
and error cases the tests do not use. Each check prints PASS or FAIL with the reason;
the script exits 1 when any fails. Progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from http_overhead import serve_http  # noqa: E402

VALVE = {"type": "function", "function": {
    "name": "set_valve", "description": "Open or close a cooling valve",
    "parameters": {"type": "object", "properties": {"valve": {"type": "integer", "minimum": 1, "maximum": 8},
                                                    "open": {"type": "boolean"}},
                   "required": ["valve", "open"], "additionalProperties": False}}}
READING = {"type": "object", "properties": {"sensor": {"type": "string", "maxLength": 24},
                                            "celsius": {"type": "number", "minimum": -40, "maximum": 150},
                                            "alarm": {"type": "boolean"}},
           "required": ["sensor", "celsius", "alarm"], "additionalProperties": False}


def openai_checks(base: str) -> dict[str, Callable[[], str]]:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    ask = [{"role": "system", "content": "Answer in one short sentence."},
           {"role": "user", "content": "What does a pressure relief valve do?"}]

    def seeded_sampling() -> str:
        kw = dict(model=model, messages=ask, temperature=0.8, top_p=0.9, seed=11, max_completion_tokens=24,
                  presence_penalty=0.5, frequency_penalty=0.3, stop=["\n\n"])
        a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
        assert a.choices[0].message.content == b.choices[0].message.content, "seeded answers differ"
        return f"{a.usage.completion_tokens} tokens, identical twice"

    def follow_up_turn() -> str:
        first = client.chat.completions.create(model=model, messages=ask, max_tokens=24)
        history = ask + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And where is it fitted?"}]
        second = client.chat.completions.create(model=model, messages=history, max_tokens=24)
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached and cached > 0, "the follow-up reused no cached prompt"
        return f"{cached} of {second.usage.prompt_tokens} prompt tokens reused"

    def schema_reading() -> str:
        import jsonschema

        reply = client.chat.completions.create(
            model=model, max_tokens=80, temperature=1.0, seed=3,
            messages=[{"role": "user", "content": "Boiler 2 reads 96.5 C, alarm on. Report it as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "reading", "schema": READING,
                                                                    "strict": True}})
        jsonschema.validate(json.loads(reply.choices[0].message.content), READING)
        return reply.choices[0].message.content

    def forced_tool_call_streamed() -> str:
        calls: dict[int, dict[str, str]] = {}
        finish = None
        for event in client.chat.completions.create(
                model=model, stream=True, tools=[VALVE], tool_choice={"type": "function",
                                                                        "function": {"name": "set_valve"}},
                messages=[{"role": "user", "content": "Open valve 3."}], max_tokens=60):
            for delta in event.choices[0].delta.tool_calls or [] if event.choices else []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            if event.choices and event.choices[0].finish_reason:
                finish = event.choices[0].finish_reason
        assert finish == "tool_calls" and calls, f"finish {finish}, calls {calls}"
        args = json.loads(calls[0]["arguments"])
        assert calls[0]["name"] == "set_valve" and 1 <= args["valve"] <= 8 and isinstance(args["open"], bool)
        return json.dumps(calls[0])

    def unknown_model_is_404() -> str:
        try:
            client.chat.completions.create(model="gpt-4o", messages=ask, max_tokens=4)
        except openai.NotFoundError as exc:
            return f"NotFoundError: {exc.message[:60]}"
        raise AssertionError("no error for an unknown model")

    def bad_value_is_400() -> str:
        try:
            client.chat.completions.create(model=model, messages=ask, max_tokens=4, top_p=1.5)
        except openai.BadRequestError as exc:
            return f"BadRequestError: {exc.message[:60]}"
        raise AssertionError("top_p 1.5 accepted")

    return {"openai seeded sampling with penalties and stop": seeded_sampling,
            "openai follow-up turn reuses the cache": follow_up_turn,
            "openai json_schema strict answer validates": schema_reading,
            "openai named tool call, streamed": forced_tool_call_streamed,
            "openai unknown model raises NotFoundError": unknown_model_is_404,
            "openai top_p out of range raises BadRequestError": bad_value_is_400}


def ollama_checks(base: str) -> dict[str, Callable[[], str]]:
    import ollama

    client = ollama.Client(host=base)
    model = client.list().models[0].model

    def chat_json_format() -> str:
        reply = client.chat(model=model, format="json", options={"num_predict": 60, "temperature": 0},
                            messages=[{"role": "user", "content": "List two metals as JSON."}])
        if reply.done_reason == "stop":
            json.loads(reply.message.content)
        return f"{reply.done_reason}: {reply.message.content[:60]}"

    def generate_stream_with_system() -> str:
        parts = [p.response for p in client.generate(model=model, prompt="Name a gas.", system="Be brief.",
                                                     stream=True, options={"num_predict": 12, "seed": 2})]
        assert parts and "".join(parts).strip(), "no text streamed"
        return f"{len(parts)} parts"

    def show_and_ps() -> str:
        info = client.show(model)
        running = client.ps()
        assert info.details is not None and running.models, "show/ps empty"
        return f"{info.details.family}, {len(running.models)} loaded"

    return {"ollama chat with format json": chat_json_format,
            "ollama generate streamed with a system prompt": generate_stream_with_system,
            "ollama show and ps": show_and_ps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    with serve_http(args.bundle, args.threads) as port:
        base = f"http://127.0.0.1:{port}"
        for name, check in {**openai_checks(base), **ollama_checks(base)}.items():
            report.stage(name)
            try:
                results[name] = {"ok": True, "detail": check()}
            except Exception as exc:  # noqa: BLE001 - every failure is a reported FAIL, not a crash
                results[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc(file=sys.stderr)
    for name, r in results.items():
        print(f"{'PASS' if r['ok'] else 'FAIL':4}  {name}  ({r['detail']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Chat messages: the one check every front runs (MQTT, OpenAI, Ollama, the Python API).

A front first translates its own message shape into OpenAI's (Ollama's `tool_name`, content
parts); `check_messages` then refuses what no front may pass on, with the same limits
everywhere, and returns copies in the shape chat templates render. Nothing else checks
messages again: the chat template renders what this returned.
"""
from __future__ import annotations

from typing import Any

from .errors import GenerationError
from .netjson import loads as read_json
from .netjson import surrogate_at

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's message fields that a template reads; Qwen3's reads an earlier turn's reasoning_content.
FIELDS = frozenset({"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content"})
# A conversation this long is not a device's request; each message is one render step (and, for
# templates that look back, more), so the count is bounded before anything renders.
MAX_MESSAGES = 256
MAX_CALLS = 64  # calls in one assistant message, as many as a request may offer tools

_FIELD = "messages"


class Messages(list):
    """Messages `check_messages` returned: whoever renders them trusts them as they are."""


def _bad(message: str) -> GenerationError:
    return GenerationError(message, field=_FIELD)


def check_messages(messages: object) -> Messages:
    """Copies of `messages`, checked (count, roles, keys, sizes, text), in the shape chat templates
    render: an assistant's `tool_calls` with `arguments` as an object (templates apply `tojson`
    to it), content "" where a call had none, and each tool result's `name` filled from the call
    it answers. GenerationError (field "messages") names the message and key at fault.
    Messages it returned come back as they are: a request's are checked once, where it arrives."""
    if isinstance(messages, Messages):
        return messages
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise _bad(f"messages has {len(messages)} entries, limit is {MAX_MESSAGES}")
    names: dict[str, str] = {}
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with role and content, got {kind(m)}")
        if unknown := sorted(set(m) - FIELDS):
            raise _bad(f"{where} has unknown field {str(unknown[0])[:40]!r}; allowed: {sorted(FIELDS)}")
        m = dict(m)
        if m.get("role") not in ROLES:
            raise _bad(f"{where}.role must be one of {list(ROLES)}, got {m.get('role')!r}")
        if m["role"] == "assistant" and m.get("tool_calls") is not None:
            m["tool_calls"] = _calls(m["tool_calls"], f"{where}.tool_calls")
            names.update((c["id"], c["function"]["name"]) for c in m["tool_calls"])
            if m.get("content") is None:
                m["content"] = ""
        if m["role"] == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _bad(f"{where}.tool_call_id must be a string, got {call_id!r}")
            name = m.setdefault("name", names.get(call_id))
            if not isinstance(name, str):
                raise _bad(f"{where}.tool_call_id {call_id!r} answers no earlier tool call; give {where}.name")
        for key in ("content", "name", "tool_call_id", "reasoning_content"):
            if (key == "content" or m.get(key) is not None) and not isinstance(m.get(key), str):
                raise _bad(f"{where}.{key} must be a string, got {m.get(key)!r}")
        no_surrogate(m, where, _FIELD)
        out.append(m)
    if not any(m["content"].strip() or m.get("tool_calls") for m in out):
        raise _bad("messages has no content")
    return Messages(out)


def no_surrogate(value: Any, where: str, field: str) -> None:
    """Refuse a lone surrogate (JSON's "\\ud800") anywhere in `value`: it parses, but no
    tokenizer takes it, and the request would fail on the worker after waiting its turn."""
    if (at := surrogate_at(value)) is not None:
        raise GenerationError(f"{at.replace('$', where, 1)} holds a lone surrogate (\\ud800-\\udfff), "
                              "which is not text", field=field)


def check_keys(value: object, where: str, allowed: set[str], field: str) -> None:
    """Refuse a non-object, or an object with a key outside `allowed` (error naming `field`)."""
    if not isinstance(value, dict):
        raise GenerationError(f"{where} must be an object, got {kind(value)}", field=field)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise GenerationError(f"{where} has unknown field {str(unknown[0])[:40]!r}; allowed: {sorted(allowed)}",
                              field=field)


def kind(value: object) -> str:
    return type(value).__name__


def _calls(calls: object, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise _bad(f"{where} must be a list, got {kind(calls)}")
    if len(calls) > MAX_CALLS:
        raise _bad(f"{where} has {len(calls)} calls, limit is {MAX_CALLS}")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        check_keys(call, at, {"id", "type", "function", "index"}, _FIELD)
        fn = call.get("function")
        check_keys(fn, f"{at}.function", {"name", "arguments"}, _FIELD)
        if not isinstance(call.get("id"), str) or call.get("type", "function") != "function":
            raise _bad(f'{at} needs a string id and type "function", got {call!r}')
        if not isinstance(fn.get("name"), str):
            raise _bad(f"{at}.function.name must be a string, got {fn.get('name')!r}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = read_json(args)  # bounded: 100,000 nested "[" raised RecursionError here
            except ValueError as e:
                raise _bad(f"{at}.function.arguments is not valid JSON: {e}") from None
        if not isinstance(args, dict):
            raise _bad(f"{at}.function.arguments must be a JSON object, got {args!r}")
        out.append({"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out

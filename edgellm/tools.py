"""Tool calls: OpenAI function tools in, the model's call syntax back out as OpenAI `tool_calls`.

Four pieces a request's Sequence holds, none of which generates anything itself:
- `parse_tools` / `parse_tool_choice` validate the request fields, errors naming the JSON path;
- `chat_inputs` turns messages (tool calls and tool results included) and the offered tools
  into what `ChatTemplate.render` takes: `tools=[...]` for a template that reads `tools`, or,
  for one that does not, the documented fallback (`FALLBACK_PREAMBLE` in a system message,
  calls and results written into plain messages in the same Hermes syntax);
- `ToolCallParser` finds calls in the generated text, streamed or whole;
- `call_schema` is the Lark grammar (llguidance dialect) that forces a call for "required"
  or a named function and checks a call once opened for "auto".

Syntaxes read: Hermes/Qwen `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` anywhere
in the text, and a whole reply that is one JSON call or a list of them (Llama 3's
`{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`; a small Qwen that
dropped its tags writes the same). Whatever does not parse into a call of an offered
function stays text: a malformed call is the model's answer, never a crash.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence


from .errors import GenerationError
from .grammar import closed_objects
from .messages import check_keys, check_messages, kind, no_surrogate
from .text import Trimmed, partial_suffix, template_variables

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
Syntax = Literal["hermes", "llama3"]
# OpenAI's rule for function names; it also keeps names safe inside a grammar literal.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_PARAMETERS = {"type": "object", "properties": {}}

FALLBACK_PREAMBLE = (
    "You can call these functions. Each is described as JSON:\n{functions}\n\n"
    "To call one, reply with exactly\n"
    f'{OPEN}{{"name": <function name>, "arguments": <arguments as a JSON object>}}{CLOSE}\n'
    "with one such block per call. Results come back inside <tool_response></tool_response>."
)


@dataclass(frozen=True)
class Tool:
    """One function the model may call; `parameters` is its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(_NO_PARAMETERS))

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI shape, which is also what Hugging Face chat templates read as `tools`."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolChoice:
    """`mode` is "auto", "none", "required" or "function" (then `name` is the function)."""

    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None

    def allowed(self, tools: Sequence[Tool]) -> list[Tool]:
        """The tools the model may call under this choice, which are also the ones offered."""
        if self.mode == "none":
            return []
        if self.mode == "function":
            return [t for t in tools if t.name == self.name]
        return list(tools)


def parse_tools(value: object) -> list[Tool]:
    """Validated `tools` of a request; None means none."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _error("tools", f"tools must be a list of function tools, got {kind(value)}")
    tools: list[Tool] = []
    for i, item in enumerate(value):
        where = f"tools[{i}]"
        check_keys(item, where, {"type", "function"}, "tools")
        if item.get("type") != "function":
            raise _error("tools", f'{where}.type must be "function", got {item.get("type")!r}')
        fn = item.get("function")
        check_keys(fn, f"{where}.function", {"name", "description", "parameters", "strict"}, "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _error("tools", f"{where}.function.name must be 1-64 letters, digits, _ or -, got {name!r}")
        if any(t.name == name for t in tools):
            raise _error("tools", f"{where}.function.name {name!r} is already the name of another tool")
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise _error("tools", f"{where}.function.description must be a string, got {kind(description)}")
        params = fn.get("parameters", dict(_NO_PARAMETERS))
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise _error("tools", f"{where}.function.parameters must be a JSON schema of type object, "
                                  f"got {params!r}")
        if not isinstance(fn.get("strict", False), bool):
            raise _error("tools", f"{where}.function.strict must be true or false, got {fn['strict']!r}")
        no_surrogate(item, where, "tools")
        tools.append(Tool(name, description, params))
    return tools


def parse_tool_choice(value: object) -> ToolChoice | None:
    """Validated `tool_choice` (its shape; `settle_choice` checks it against the tools); None: not given."""
    if value is None or isinstance(value, ToolChoice):
        return value
    if value in ("auto", "none", "required"):
        return ToolChoice(value)  # type: ignore[arg-type]
    if isinstance(value, dict):
        check_keys(value, "tool_choice", {"type", "function"}, "tool_choice")
        fn = value.get("function")
        if value.get("type") == "function" and isinstance(fn, dict) and isinstance(fn.get("name"), str):
            check_keys(fn, "tool_choice.function", {"name"}, "tool_choice")
            return ToolChoice("function", fn["name"])
    raise _error("tool_choice", 'tool_choice must be "auto", "none", "required" or '
                          f'{{"type": "function", "function": {{"name": ...}}}}, got {value!r}')


def settle_choice(choice: ToolChoice | None, tools: Sequence[Tool]) -> ToolChoice:
    """The choice in force: OpenAI's default for None ("auto" with tools, else "none");
    GenerationError when it asks for a call no offered tool can make."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if choice.mode == "required" and not tools:
        raise _error("tool_choice", 'tool_choice is "required" but the request has no tools')
    if choice.mode == "function" and not any(t.name == choice.name for t in tools):
        raise _error("tool_choice", f"tool_choice.function.name {choice.name!r} is not one of the tools "
                              f"{[t.name for t in tools]}")
    return choice


def _error(field: str, message: str) -> GenerationError:
    return GenerationError(message, field=field)


def call_syntax(source: str | None) -> Syntax:
    """The call syntax a model was trained on, read from its chat template; Hermes (also the
    fallback prompt's syntax) unless the template is Llama 3's."""
    if source and OPEN not in source and (PYTHON_TAG in source or "Environment: ipython" in source):
        return "llama3"
    return "hermes"


def chat_inputs(messages: object, template_source: str | None, tools: Sequence[Tool],
                choice: ToolChoice) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, template variables) for `ChatTemplate.render(messages, **variables)`."""
    msgs = check_messages(messages)
    offered = choice.allowed(tools)
    if "tools" in template_variables(template_source):
        return msgs, ({"tools": [t.to_openai() for t in offered]} if offered else {})
    return _fallback_messages(msgs, offered), {}


def _fallback_messages(msgs: list[dict[str, Any]], offered: list[Tool]) -> list[dict[str, Any]]:
    """The conversation for a template that knows no tools: the preamble joins the system
    message, calls become assistant text and each run of results one user message, so
    templates that insist on alternating user/assistant turns still render it."""
    out: list[dict[str, Any]] = []
    for m in msgs:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [OPEN + json.dumps({"name": c["function"]["name"],
                                         "arguments": c["function"]["arguments"]},
                                        ensure_ascii=False) + CLOSE for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join([m["content"], *blocks]).strip()})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        else:
            out.append(m)
    for m in out:
        m.pop("tool_results", None)
    if offered:
        functions = "\n".join(json.dumps(t.to_openai()["function"], ensure_ascii=False)
                              for t in offered)
        preamble = FALLBACK_PREAMBLE.replace("{functions}", functions)
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + preamble}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


# --- constraining a call ------------------------------------------------------------------

# Separators as `json.dumps` writes them, which is how templates render past calls: the
# model stays on the layout it was trained on and cannot wander off into whitespace.
_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def call_schema(tools: Sequence[Tool], choice: ToolChoice, syntax: Syntax = "hermes",
                answer: str | None = None, tag_tokens: bool = False,
                parallel: bool = True) -> dict[str, str] | None:
    """The grammar, as a request's `grammar` field `{"type": "lark", "value": ...}`, that
    constrains the reply to calls allowed by `choice`; None where nothing is constrained.

    Arguments hold the declared parameters and no others (`closed_objects`, as OpenAI's
    strict mode). "required" and a named function force one or more calls and nothing else; "auto"
    leaves text free until the model opens a call, then holds the call to a schema, or,
    with `answer` (a JSON schema as text: the request's response_format), makes the reply
    either calls or one JSON value under that schema. `tag_tokens`: the vocabulary has the
    Hermes tags as tokens of their own (Qwen's), which the grammar then names as tokens,
    so the model writes the tag it was trained on rather than spelling it out. Without
    `parallel`, a reply holds one call at most.
    """
    allowed = choice.allowed(tools)
    if not allowed:
        return None
    key = "arguments" if syntax == "hermes" else "parameters"
    bodies = [{"type": "object", "properties": {"name": {"const": t.name}, key: closed_objects(t.parameters)},
               "required": ["name", key], "additionalProperties": False} for t in allowed]
    schema = {"x-guidance": _LAYOUT, **(bodies[0] if len(bodies) == 1 else {"anyOf": bodies})}
    rules = ["body: %json " + json.dumps(schema, ensure_ascii=False)]
    forced = choice.mode != "auto"
    if answer is not None and not forced:
        rules.append("answer: %json " + answer)
    if syntax == "llama3":
        # A reply is either one JSON call or text that does not open with "{".
        if forced:
            rules.insert(0, "start: body")
        elif answer is not None:
            rules.insert(0, "start: answer | body")
        else:
            rules[:0] = ["start: TEXT | body", "TEXT: /\\s*([^{\\s](?s:.*))?/"]
        return {"type": "lark", "value": "\n".join(rules) + "\n"}
    open_, close = (OPEN, CLOSE) if tag_tokens else (f'"{OPEN}"', f'"{CLOSE}"')
    call = f'call: {open_} "\\n" body "\\n" {close}'
    more = "*" if parallel else "?"
    if forced or answer is not None:
        calls = 'call ("\\n" call)*' if parallel else "call"
        rules[:0] = [f'start: {"" if forced else "answer | "}{calls}', call]
    elif tag_tokens:
        # Text cannot hold a token llguidance counts as special, so it ends where the tag comes.
        rules[:0] = [f"start: TEXT (call TEXT){more}", "TEXT: /(?s:.*)/", call]
    else:
        # The head is lazy, so it ends at the first open tag; the tail may hold no open tag,
        # so an opened call cannot escape its schema by being read as text.
        rules[:0] = [f"start: (head call){more} TAIL", f"head[lazy]: /(?s:.*){OPEN}/",
                     f'call: "\\n" body "\\n" {close}', f"TAIL: /(?s:.*)/ & ~/(?s:.*){OPEN}(?s:.*)/"]
    return {"type": "lark", "value": "\n".join(rules) + "\n"}


# --- parsing the model's calls ------------------------------------------------------------

Event = str | dict[str, Any]  # a text delta or an OpenAI tool-call delta


def _random_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Splits generated text into content and tool calls, delta by delta.

    `feed` returns events: a `str` is a text delta, released once it can no longer be the
    start of a call; a `dict` is an OpenAI tool-call delta, `{"index", "id", "type",
    "function": {"name", "arguments": ""}}` then `{"index", "function": {"arguments"}}`.
    A call is released whole, once it parses: a malformed one can still turn back into
    text, so the streamed result always equals the parse of the whole text. Whitespace
    around calls is dropped, except one run that still parts the text before a call from
    the text after it. A reply that opens with "{", "[" or `<|python_tag|>` may be a
    whole-message call and is held to the end.
    """

    def __init__(self, tools: Sequence[Tool], make_id: Callable[[], str] = _random_id) -> None:
        self._names = {t.name for t in tools}
        self._make_id = make_id
        self._buf = ""
        self._whole: bool | None = None  # None: the reply's first characters are still unseen
        self._in_call = False
        # Text between calls: the whitespace after a call is dropped, trailing whitespace held
        # until more text follows (a reply that is only calls has no text at all).
        self._text_out = Trimmed()
        self.calls: list[dict[str, Any]] = []

    def feed(self, delta: str) -> list[Event]:
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> tuple[list[Event], list[dict[str, Any]]]:
        """(the remaining events, every parsed call in OpenAI's `tool_calls` shape)."""
        events: list[Event] = []
        if self._whole is not False:
            calls = _whole_message_calls(self._buf, self._names)
            if calls:
                self._buf = ""
                for name, args in calls:
                    events += self._emit_call(name, args)
            self._whole = False
        events += self._drain(final=True)
        if not self.calls and self._text_out.held:
            events.append(self._text_out.held)
        self._text_out.held = ""
        return events, self.calls

    def _drain(self, final: bool) -> list[Event]:
        if self._whole is None:
            head = self._buf.lstrip()
            if not head or PYTHON_TAG.startswith(head):
                return []
            self._whole = head.startswith(("{", "[", PYTHON_TAG))
        if self._whole:  # until finish, which settles it
            return []
        events: list[Event] = []
        while True:
            if self._in_call:
                end = self._buf.find(CLOSE)
                if end < 0 and not final:
                    return events
                body = self._buf if end < 0 else self._buf[:end]
                self._buf = "" if end < 0 else self._buf[end + len(CLOSE):]
                self._in_call = False
                call = _call_from_json(body, self._names)
                if call:
                    events += self._emit_call(*call)
                else:
                    events += self._text(OPEN + body + ("" if end < 0 else CLOSE))
                continue
            start = self._buf.find(OPEN)
            if start >= 0:
                events += self._text(self._buf[:start])
                self._buf = self._buf[start + len(OPEN):]
                self._in_call = True
                continue
            keep = 0 if final else partial_suffix(self._buf, OPEN)
            events += self._text(self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return events

    def _text(self, text: str) -> list[Event]:
        out = self._text_out.push(text)
        return [out] if out else []

    def _emit_call(self, name: str, args: dict[str, Any]) -> list[Event]:
        index, call_id = len(self.calls), self._make_id()
        arguments = json.dumps(args, ensure_ascii=False)
        self.calls.append({"id": call_id, "type": "function",
                           "function": {"name": name, "arguments": arguments}})
        self._text_out.strip_lead = True
        return [{"index": index, "id": call_id, "type": "function",
                 "function": {"name": name, "arguments": ""}},
                {"index": index, "function": {"arguments": arguments}}]


def _call_from_json(text: str, names: set[str]) -> tuple[str, dict[str, Any]] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return _as_call(value, names)


def _as_call(value: object, names: set[str]) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) when `value` calls an offered function; arguments may be missing
    (a function without parameters), an object, or an object written as a JSON string.
    Any other key means the model wrote something else, whose arguments would be lost."""
    if (not isinstance(value, dict) or value.get("name") not in names
            or set(value) - {"name", "arguments", "parameters"}):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return (value["name"], args) if isinstance(args, dict) else None


def _whole_message_calls(text: str, names: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """The calls of a reply that is nothing but one JSON call or a list of them."""
    text = text.strip()
    if text.startswith(PYTHON_TAG):
        text = text[len(PYTHON_TAG):]
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(v, names) for v in items]
    return calls if items and all(calls) else []  # type: ignore[return-value]


def merge_deltas(calls: list[dict[str, Any]], deltas: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed tool-call deltas folded into `calls` (OpenAI's `tool_calls` shape), in place."""
    for delta in deltas:
        index = delta["index"]
        if index == len(calls):
            calls.append({"id": delta["id"], "type": "function",
                          "function": {"name": delta["function"]["name"], "arguments": ""}})
        calls[index]["function"]["arguments"] += delta["function"].get("arguments", "")
    return calls

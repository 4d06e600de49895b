"""Tool calls: request validation, rendering through chat templates, parsing calls whole and
streamed, and the grammar that constrains a call."""
from __future__ import annotations

import itertools
import json
import random

import pytest

from edgellm.errors import GenerationError
from edgellm.messages import check_messages
from edgellm.text import ChatTemplate, template_variables
from edgellm.tools import (FALLBACK_PREAMBLE, Tool, ToolCallParser, ToolChoice, call_schema,
                           call_syntax, chat_inputs,
                           parse_tool_choice, parse_tools, settle_choice)
from tests.tiny import CHAT_TEMPLATE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
LIGHT = {"type": "function", "function": {
    "name": "set_light", "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}},
                                        "required": ["on"]}}}
TOOLS = parse_tools([WEATHER, LIGHT])

# A Qwen2.5-style template reduced to what matters here: it reads `tools`, renders calls
# with `arguments | tojson` and results as <tool_response> turns.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls %}<tool_call>\n"
    "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like Gemma's: no tools, no tool role, and turns must alternate.
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('role ' + m.role) }}{% endif %}"
    "{% if loop.index0 and messages[loop.index0 - 1].role == m.role %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "[{{ m.role }}] {{ m.content }}\n{% endfor %}"
)
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "24 C, clear"},
]


# --- request fields -----------------------------------------------------------------------

def test_tools_parse_into_their_openai_shape():
    assert [t.name for t in TOOLS] == ["get_weather", "set_light"]
    assert TOOLS[0].to_openai() == WEATHER
    assert TOOLS[1].description == ""
    bare = parse_tools([{"type": "function", "function": {"name": "ping"}}])
    assert bare == [Tool("ping", "", {"type": "object", "properties": {}})]
    assert parse_tools(None) == []


@pytest.mark.parametrize("value, path", [
    ({"type": "function"}, "tools must be a list"),
    ([WEATHER, "x"], "tools[1] must be an object"),
    ([{"type": "code", "function": {"name": "f"}}], "tools[0].type"),
    ([{"type": "function"}], "tools[0].function must be an object"),
    ([WEATHER, {"type": "function", "function": {"name": "bad name"}}], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "tools[0].function.name"),
    ([WEATHER, WEATHER], "tools[1].function.name 'get_weather' is already"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "paramters": {}}}],
     "tools[0].function has unknown field 'paramters'"),
    ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "tools[0].function.strict"),
])
def test_bad_tools_name_their_path(value, path):
    with pytest.raises(GenerationError) as err:
        parse_tools(value)
    assert path in str(err.value)


def test_tool_choice():
    assert settle_choice(parse_tool_choice(None), TOOLS) == ToolChoice("auto")
    assert settle_choice(parse_tool_choice(None), []) == ToolChoice("none")
    assert settle_choice(parse_tool_choice("required"), TOOLS) == ToolChoice("required")
    named = settle_choice(parse_tool_choice({"type": "function", "function": {"name": "set_light"}}), TOOLS)
    assert named == ToolChoice("function", "set_light")
    assert [t.name for t in named.allowed(TOOLS)] == ["set_light"]
    assert ToolChoice("none").allowed(TOOLS) == [] and ToolChoice("auto").allowed(TOOLS) == TOOLS


@pytest.mark.parametrize("value, tools, message", [
    ("required", [], 'tool_choice is "required" but the request has no tools'),
    ({"type": "function", "function": {"name": "nope"}}, TOOLS, "tool_choice.function.name 'nope'"),
    ("any", TOOLS, "tool_choice must be"),
    ({"type": "function", "function": "set_light"}, TOOLS, "tool_choice must be"),
    ({"type": "function", "name": "set_light"}, TOOLS, "tool_choice has unknown field 'name'"),
])
def test_bad_tool_choice(value, tools, message):
    with pytest.raises(GenerationError) as err:
        settle_choice(parse_tool_choice(value), tools)
    assert message in str(err.value)


# --- messages and rendering ---------------------------------------------------------------

def test_round_trip_messages_are_normalised_for_templates():
    before = json.dumps(ROUND_TRIP)
    msgs = check_messages(ROUND_TRIP)
    assert json.dumps(ROUND_TRIP) == before  # the caller's messages are not touched
    assert msgs[1]["content"] == ""
    args = [c["function"]["arguments"] for c in msgs[1]["tool_calls"]]
    assert args == [{"city": "Paris"}, {"city": "Rome"}]
    assert msgs[2]["name"] == msgs[3]["name"] == "get_weather"


@pytest.mark.parametrize("patch, path", [
    ({1: {"role": "robot"}}, "messages[1].role"),
    ({1: {"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}},
     "messages[1].tool_calls[0].function.arguments is not valid JSON"),
    ({1: {"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}},
     "messages[1].tool_calls[0].function.arguments must be a JSON object"),
    ({1: {"tool_calls": [{"function": {"name": "f"}}]}}, "messages[1].tool_calls[0] needs a string id"),
    ({1: {"tool_calls": {"id": "c"}}}, "messages[1].tool_calls must be a list"),
    ({2: {"tool_call_id": "call_9"}}, "messages[2].tool_call_id 'call_9' answers no earlier tool call"),
    ({2: {"tool_call_id": None}}, "messages[2].tool_call_id must be a string"),
    ({0: {"content": None}}, "messages[0].content must be a string"),
])
def test_bad_messages_name_their_path(patch, path):
    msgs = [{**m, **patch.get(i, {})} for i, m in enumerate(ROUND_TRIP)]
    with pytest.raises(GenerationError) as err:
        check_messages(msgs)
    assert path in str(err.value)


def test_tools_aware_template_renders_tools_and_the_round_trip():
    assert "tools" in template_variables(TOOLS_TEMPLATE)
    msgs, extra = chat_inputs(ROUND_TRIP, TOOLS_TEMPLATE, TOOLS, ToolChoice("auto"))
    prompt = ChatTemplate(TOOLS_TEMPLATE).render(msgs, **extra)
    assert all(json.dumps(t.to_openai()) in prompt for t in TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n24 C, clear\n</tool_response>" in prompt
    assert FALLBACK_PREAMBLE[:20] not in prompt
    # A named choice offers only that function; "none" offers none.
    _, named = chat_inputs(ROUND_TRIP, TOOLS_TEMPLATE, TOOLS, ToolChoice("function", "set_light"))
    assert [t["function"]["name"] for t in named["tools"]] == ["set_light"]
    assert chat_inputs(ROUND_TRIP, TOOLS_TEMPLATE, TOOLS, ToolChoice("none"))[1] == {}


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, STRICT_TEMPLATE], ids=["chatml", "alternating"])
def test_fallback_prompt_for_templates_without_tools(template):
    assert "tools" not in template_variables(template)
    msgs, extra = chat_inputs(ROUND_TRIP, template, TOOLS, ToolChoice("auto"))
    assert extra == {}
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    prompt = ChatTemplate(template).render(msgs)
    assert '"name": "get_weather"' in prompt and '"name": "set_light"' in prompt
    assert "reply with exactly\n<tool_call>" in prompt
    assert ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>') in prompt
    assert "<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n24 C, clear" in prompt


def test_fallback_preamble_joins_an_existing_system_message():
    msgs, _ = chat_inputs([{"role": "system", "content": "Be brief."}, *ROUND_TRIP[:1]],
                          CHAT_TEMPLATE, TOOLS, ToolChoice("auto"))
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\nYou can call these functions.")
    plain, _ = chat_inputs(ROUND_TRIP[:1], CHAT_TEMPLATE, TOOLS, ToolChoice("none"))
    assert plain == ROUND_TRIP[:1]


def test_call_syntax_and_variables_from_the_template():
    assert call_syntax(TOOLS_TEMPLATE) == "hermes"
    llama = "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n' }}{{ tools }}"
    assert call_syntax(llama) == "llama3"
    assert call_syntax("{{ '<|python_tag|>' }}") == "llama3"
    assert call_syntax(None) == call_syntax(CHAT_TEMPLATE) == "hermes"
    assert template_variables("{% if x %}") == frozenset() and template_variables(None) == frozenset()


# --- parsing calls ------------------------------------------------------------------------

def counter_ids():
    count = itertools.count()
    return lambda: f"call_{next(count)}"


def call(name, args, i):
    return {"id": f"call_{i}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


PARIS = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
LAMP = '{"name": "set_light", "arguments": {"on": true}}'
CASES = [
    # (model output, content, calls)
    (f"Sure.\n<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n{LAMP}\n</tool_call>\n", "Sure.",
     [call("get_weather", {"city": "Paris", "unit": "C"}, 0), call("set_light", {"on": True}, 1)]),
    (f"<tool_call>{LAMP}</tool_call>", "", [call("set_light", {"on": True}, 0)]),
    (f"<tool_call>\n{LAMP}\n", "", [call("set_light", {"on": True}, 0)]),  # EOS before the close tag
    (f"A <tool_call>{LAMP}</tool_call> then B", "A then B", [call("set_light", {"on": True}, 0)]),
    ('<tool_call>{"name": "set_light", "arguments": "{\\"on\\": false}"}</tool_call>', "",
     [call("set_light", {"on": False}, 0)]),
    ('<tool_call>{"name": "ping"}</tool_call>', None, []),  # ping is not offered: text
    ('Hi <tool_call>{"name": "set_light", "arguments": {"on": tru</tool_call> ok\n',
     'Hi <tool_call>{"name": "set_light", "arguments": {"on": tru</tool_call> ok\n', []),
    ('<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', None, []),
    ("<tool_call>{oops", "<tool_call>{oops", []),
    ("a <tool_ca b <tool_call", "a <tool_ca b <tool_call", []),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', "",
     [call("get_weather", {"city": "Oslo"}, 0)]),
    (f'  [{LAMP}, {{"name": "get_weather", "parameters": {{"city": "Rome"}}}}]\n', "",
     [call("set_light", {"on": True}, 0), call("get_weather", {"city": "Rome"}, 1)]),
    (PARIS.replace("arguments", "args"), None, []),  # an unknown key: not a call we can read
    ('{"name": "set_light"}', "", [call("set_light", {}, 0)]),  # no arguments: none
    ('{"answer": 42}', '{"answer": 42}', []),
    (f"{{not json}} <tool_call>{LAMP}</tool_call>", "{not json}", [call("set_light", {"on": True}, 0)]),
    ("<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    ("Plain answer.\n\n", "Plain answer.\n\n", []),
    ("  <|py", "  <|py", []),
    ("", "", []),
]



def parse_calls(text: str, tools, make_id=None) -> tuple[str, list]:
    """(content, tool_calls) of a whole reply, through the streaming parser in one feed."""
    parser = ToolCallParser(tools, make_id) if make_id else ToolCallParser(tools)
    events = parser.feed(text)
    rest, calls = parser.finish()
    return "".join(e for e in events + rest if isinstance(e, str)), calls


@pytest.mark.parametrize("text, content, calls", CASES)
def test_parse_calls(text, content, calls):
    got_content, got_calls = parse_calls(text, TOOLS, counter_ids())
    if content is None:  # a call that is not a call stays exactly as written
        content = text
    assert (got_content, got_calls) == (content, calls)


def stream_events(text, cuts):
    parser = ToolCallParser(TOOLS, counter_ids())
    events = []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        events += parser.feed(text[a:b])
    rest, calls = parser.finish()
    return events + rest, calls


def collapse(events):
    """Text and calls as a streaming client assembles them from the deltas."""
    text, calls = "", {}
    for e in events:
        if isinstance(e, str):
            text += e
            continue
        slot = calls.setdefault(e["index"], {"id": None, "name": None, "arguments": ""})
        if "id" in e:
            assert slot["id"] is None and e["type"] == "function"
            slot["id"], slot["name"] = e["id"], e["function"]["name"]
        slot["arguments"] += e["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return text, [{"id": c["id"], "type": "function",
                   "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls.values()]


@pytest.mark.parametrize("text", [c[0] for c in CASES])
def test_streaming_equals_parsing_the_whole_text_wherever_the_deltas_split(text):
    whole = parse_calls(text, TOOLS, counter_ids())
    splits = [[i] for i in range(1, len(text))] + [list(range(1, len(text)))]
    rng = random.Random(len(text))
    splits += [sorted(rng.sample(range(1, len(text)), max(0, min(5, len(text) - 1)))) for _ in range(20)]
    for cuts in splits:
        events, calls = stream_events(text, cuts)
        assert all(e for e in events if isinstance(e, str))  # no empty text deltas
        assert collapse(events) == whole and calls == whole[1], cuts


def test_text_is_released_as_soon_as_it_cannot_open_a_call():
    parser = ToolCallParser(TOOLS, counter_ids())
    assert parser.feed("The lamp") == ["The lamp"]
    assert parser.feed(" is <tool") == [" is"]  # the space may only separate a call
    assert parser.feed("kit>") == [" <toolkit>"]
    assert parser.feed(f" <tool_call>{LAMP[:20]}") == []
    header, args = parser.feed(f"{LAMP[20:]}</tool_call>")
    assert header == {"index": 0, "id": "call_0", "type": "function",
                      "function": {"name": "set_light", "arguments": ""}}
    assert args == {"index": 0, "function": {"arguments": '{"on": true}'}}
    assert parser.feed("\n") == []
    assert parser.finish() == ([], [call("set_light", {"on": True}, 0)])


def test_a_reply_opening_with_json_is_held_to_the_end():
    parser = ToolCallParser(TOOLS, counter_ids())
    assert parser.feed(" {\"name\": ") == [] and parser.feed('"x"} and more') == []
    assert parser.finish() == ([' {"name": "x"} and more'], [])


def test_call_ids_are_unique_by_default():
    text = f"<tool_call>{LAMP}</tool_call><tool_call>{LAMP}</tool_call>"
    ids = [c["id"] for c in parse_calls(text, TOOLS)[1] + parse_calls(text, TOOLS)[1]]
    assert len(set(ids)) == 4 and all(i.startswith("call_") and len(i) > 10 for i in ids)


# --- constraining calls -------------------------------------------------------------------

W = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
L = '<tool_call>\n{"name": "set_light", "arguments": {"on": true}}\n</tool_call>'


@pytest.fixture(scope="module")
def accepts():
    """Whether a grammar accepts a whole string (True), a prefix of one (None) or neither."""
    llguidance = pytest.importorskip("llguidance")
    tok = llguidance.LLTokenizer("byte")

    def check(grammar: dict, text: str) -> bool | None:
        assert grammar["type"] == "lark"
        compiled = llguidance.grammar_from("lark", grammar["value"])
        is_error, warnings = llguidance.LLMatcher.validate_grammar_with_warnings(compiled)
        assert not is_error and not warnings, warnings
        matcher = llguidance.LLMatcher(tok, compiled)
        if not matcher.consume_tokens(tok.tokenize_str(text)) or matcher.is_error():
            return False
        return True if matcher.is_accepting() else None
    return check


@pytest.mark.parametrize("choice, text, verdict", [
    ("required", W, True), ("required", L, True), ("required", W + "\n" + L, True),
    ("required", "Hello", False), ("required", "<tool_", None),
    ("required", W.replace('"Paris"', "5"), False),  # arguments follow the schema
    ("required", W.replace('{"city"', '{ "city"'), False),  # and json.dumps' layout
    ("required", '<tool_call>\n{"name": "ping"', False),
    ("set_light", L, True), ("set_light", W, False),
    ("auto", "Hello", True), ("auto", "", True), ("auto", f"Hi {W} and {L}", True),
    ("auto", "Hi <tool_call>\nfree text", False),  # an opened call cannot escape its schema
    ("auto", "a<tool_call>b", False), ("auto", "<tool_", True),
])
def test_call_schema_hermes(accepts, choice, text, verdict):
    mode = ToolChoice("function", choice) if choice == "set_light" else ToolChoice(choice)
    assert accepts(call_schema(TOOLS, mode), text) is verdict


@pytest.mark.parametrize("choice, text, verdict", [
    ("required", '{"name": "get_weather", "parameters": {"city": "Paris"}}', True),
    ("required", "Hello", False),
    ("auto", '{"name": "set_light", "parameters": {"on": false}}', True),
    ("auto", "Hello {", True), ("auto", '{"name": "nope"', False),
])
def test_call_schema_llama3(accepts, choice, text, verdict):
    assert accepts(call_schema(TOOLS, ToolChoice(choice), "llama3"), text) is verdict


def test_no_grammar_without_callable_tools():
    assert call_schema(TOOLS, ToolChoice("none")) is None
    assert call_schema([], ToolChoice("auto")) is None


def test_constrained_calls_parse_back(accepts):
    """What the grammar lets through is what the parser reads as calls."""
    text = f"{W}\n{L}"
    assert accepts(call_schema(TOOLS, ToolChoice("required")), text)
    assert parse_calls(text, TOOLS, counter_ids()) == (
        "", [call("get_weather", {"city": "Paris"}, 0), call("set_light", {"on": True}, 1)])

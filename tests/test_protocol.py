"""The MQTT wire protocol without a broker: validation, error codes, replies, sentences, schemas."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from edgellm.errors import RequestError
from edgellm.service import protocol as proto
from mqtt_helpers import load_schema, schema_errors

DOCS = Path(__file__).parent.parent / "docs" / "mqtt.md"


def parse(data: Any, **kw: Any) -> proto.Request:
    return proto.parse_request(json.dumps(data).encode(), **kw)


def code_of(payload: bytes, **kw: Any) -> str:
    with pytest.raises(RequestError) as info:
        proto.parse_request(payload, **kw)
    return info.value.code


def test_prompt_request_maps_wire_names_to_stream_params():
    r = parse({"id": "a-1", "prompt": "hi", "max_tokens": 5, "temperature": 0, "top_p": 1, "stop": "\n",
               "logit_bias": {"7": -100, "12": 2.5}, "seed": 3})
    assert r.id == "a-1" and r.prompt == "hi" and r.stream is True and r.reply_to is None
    assert r.params == {"max_new_tokens": 5, "temperature": 0, "top_p": 1, "seed": 3, "stop": ["\n"],
                        "logit_bias": {7: -100.0, 12: 2.5}}


def test_messages_request_keeps_roles_and_options():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = parse({"id": "m", "messages": msgs, "stream": "sentence", "reply_to": "home/dev/answers"})
    assert r.prompt == msgs and r.stream == "sentence" and r.reply_to == "home/dev/answers"
    assert parse({"id": "m", "prompt": "x", "stream": False}).stream is False


BAD = {
    "not json": b"{nope",
    "not utf-8": b'{"id": "\xff"}',
    "not an object": b"[1, 2]",
    "NaN": b'{"id": "a", "prompt": "x", "temperature": NaN}',
    "missing id": b'{"prompt": "x"}',
    "id with slash": b'{"id": "a/b", "prompt": "x"}',
    "id wildcard": b'{"id": "#", "prompt": "x"}',
    "id not string": b'{"id": 7, "prompt": "x"}',
    "unknown field": b'{"id": "a", "prompt": "x", "temprature": 1}',
    "prompt and messages": b'{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}',
    "neither": b'{"id": "a"}',
    "empty prompt": b'{"id": "a", "prompt": ""}',
    "blank prompt": b'{"id": "a", "prompt": "  \\n"}',
    "prompt not string": b'{"id": "a", "prompt": ["x"]}',
    "empty messages": b'{"id": "a", "messages": []}',
    "bad role": b'{"id": "a", "messages": [{"role": "robot", "content": "x"}]}',
    "message extra key": b'{"id": "a", "messages": [{"role": "user", "content": "x", "weight": 2}]}',
    "message content not string": b'{"id": "a", "messages": [{"role": "user", "content": 1}]}',
    "messages without content": b'{"id": "a", "messages": [{"role": "user", "content": ""}]}',
    "temperature string": b'{"id": "a", "prompt": "x", "temperature": "hot"}',
    "temperature negative": b'{"id": "a", "prompt": "x", "temperature": -0.1}',
    "max_tokens float": b'{"id": "a", "prompt": "x", "max_tokens": 1.5}',
    "max_tokens bool": b'{"id": "a", "prompt": "x", "max_tokens": true}',
    "max_tokens zero": b'{"id": "a", "prompt": "x", "max_tokens": 0}',
    "top_p zero": b'{"id": "a", "prompt": "x", "top_p": 0}',
    "top_p above one": b'{"id": "a", "prompt": "x", "top_p": 1.01}',
    "seed negative": b'{"id": "a", "prompt": "x", "seed": -1}',
    "stream yes": b'{"id": "a", "prompt": "x", "stream": "yes"}',
    "stream one": b'{"id": "a", "prompt": "x", "stream": 1}',
    "stop empty string": b'{"id": "a", "prompt": "x", "stop": [""]}',
    "stop too many": b'{"id": "a", "prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i"]}',
    "logit_bias bad key": b'{"id": "a", "prompt": "x", "logit_bias": {"the": 1}}',
    "logit_bias out of range": b'{"id": "a", "prompt": "x", "logit_bias": {"5": 101}}',
    "reply_to wildcard": b'{"id": "a", "prompt": "x", "reply_to": "a/#"}',
    "reply_to system topic": b'{"id": "a", "prompt": "x", "reply_to": "$SYS/x"}',
}
# Rules a JSON Schema cannot state: the protocol checks them, the schema does not.
SCHEMA_BLIND = {"not json", "not utf-8", "NaN", "blank prompt", "messages without content"}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_requests_are_bad_request_with_a_one_line_message(name):
    with pytest.raises(RequestError) as info:
        proto.parse_request(BAD[name])
    assert info.value.code == proto.BAD_REQUEST
    assert str(info.value) and "\n" not in str(info.value)


def test_oversized_payload_is_too_large_before_parsing():
    big = json.dumps({"id": "a", "prompt": "x" * 2000}).encode()
    assert code_of(big, max_bytes=1000) == proto.TOO_LARGE
    assert code_of(b"\xff" * 2000, max_bytes=1000) == proto.TOO_LARGE
    assert parse({"id": "a", "prompt": "x" * 900}, max_bytes=1000).prompt == "x" * 900


def test_error_messages_name_the_field_at_fault():
    with pytest.raises(RequestError, match="temperature"):
        proto.parse_request(BAD["temperature string"])
    with pytest.raises(RequestError, match="temprature"):
        proto.parse_request(BAD["unknown field"])
    with pytest.raises(RequestError, match=r"messages\[0\]\.role"):
        proto.parse_request(BAD["bad role"])


def test_peek_recovers_id_and_reply_to_of_invalid_requests_only_when_safe():
    assert proto.peek(b'{"id": "q1", "reply_to": "r/t", "prompt": 5}') == ("q1", "r/t")
    assert proto.peek(b'{"id": "a/b", "reply_to": "r/#"}') == (None, None)
    assert proto.peek(b"garbage") == (None, None)
    assert proto.peek(b'{"id": "q1", "reply_to": "r/t"}', max_bytes=4) == ("q1", None)  # too large: the id only


def test_cancel_payload_must_carry_the_requests_key():
    assert proto.parse_cancel(b'{"id": "q1", "cancel_key": "secret-1"}') == ("q1", "secret-1")
    for bad in (b'{"id": "q1"}', b"{}", b'{"id": "q1", "cancel_key": "secret-1", "x": 1}', b'{"id": 3}', b"[]", b"x",
                b'{"id": "q1", "cancel_key": "short"}', b'{"id": "q1", "cancel_key": "secret\\n-1"}'):
        with pytest.raises(RequestError):
            proto.parse_cancel(bad)


def test_cancel_key_is_a_request_field():
    assert parse({"id": "a", "prompt": "x", "cancel_key": "k-123456"}).cancel_key == "k-123456"
    for key in ("short", 12345678, "x" * 129, "naïve-key"):
        with pytest.raises(RequestError, match="cancel_key"):
            parse({"id": "a", "prompt": "x", "cancel_key": key})


@pytest.mark.parametrize("payload", [
    b'{"id": "a", "prompt": "hi", "reply_to": "a\\ud800"}',
    b'{"id": "a", "prompt": "x\\udfff"}',
    b'{"id": "a", "messages": [{"role": "user", "content": "\\ud83d"}]}',
    b'{"id": "a", "prompt": "hi", "stop": ["\\udc00"]}',
    b'{"id": "a", "prompt": "hi", "\\ud800": 1}',
])
def test_lone_surrogates_are_bad_requests_wherever_they_are(payload):
    with pytest.raises(RequestError) as err:
        proto.parse_request(payload)
    assert err.value.code == proto.BAD_REQUEST and "surrogate" in str(err.value)
    assert proto.peek(payload)[1] is None  # never a reply topic that cannot be published


def test_a_surrogate_pair_is_text():
    assert parse({"id": "a", "prompt": "\U0001F600"}).prompt == "\U0001F600"
    assert proto.parse_request(b'{"id": "a", "prompt": "\\ud83d\\ude00"}').prompt == "\U0001F600"


def test_peek_id_reads_only_the_head_of_a_payload():
    assert proto.peek_id(b'{"id": "big-1", "prompt": "' + b"x" * 100_000) == "big-1"
    assert proto.peek_id(b'{"prompt": "' + b"x" * 5000 + b'", "id": "late"}') is None
    assert proto.peek_id(b'{"id": "a/b"}') is None


def test_reply_topics_under_the_prefix_must_be_response_topics():
    t = proto.Topics("edgellm", "kitchen")
    for ok in ("my/answers", "edgellm/kitchen/response/7", "edgellm/other/response/x/y", "edgellmx/dev/request"):
        assert t.reply_problem(ok) is None, ok
    for bad in ("edgellm/kitchen/request", "edgellm/other/request", "edgellm/other/status", "edgellm/other/cancel",
                "edgellm/kitchen/status/member-2", "edgellm/kitchen/errors", "edgellm/kitchen/response",
                "$SYS/broker/x", "a/+/b", "a/#", "a\0b", "x" * 1025, "a\ud800"):
        assert t.reply_problem(bad), bad


def test_the_packet_limit_leaves_room_to_answer_too_large():
    assert proto.packet_limit(1000) > 4 * 1000


def test_topics():
    t = proto.Topics("edgellm", "kitchen")
    assert (t.request, t.cancel, t.status, t.response("7")) == (
        "edgellm/kitchen/request", "edgellm/kitchen/cancel", "edgellm/kitchen/status", "edgellm/kitchen/response/7")
    for prefix, device in (("a/+", "d"), ("p", "a/b"), ("p", "#"), ("$SYS", "d"), ("p/", "d")):
        with pytest.raises(ValueError):
            proto.Topics(prefix, device)


# -- sentence streaming -------------------------------------------------------

@pytest.mark.parametrize("text, sentences", [
    ("Hello there. How are you? Fine!", ["Hello there. ", "How are you? ", "Fine!"]),
    ('He said "stop." Then left.', ['He said "stop." ', "Then left."]),
    ("Dr. Smith met Mr. J. Doe, e.g. today. Ok.", ["Dr. Smith met Mr. J. Doe, e.g. today. ", "Ok."]),
    ("Pi is 3.14 today. Yes.", ["Pi is 3.14 today. ", "Yes."]),
    ("Steps:\n1. Mix well\n2. Bake", ["Steps:\n", "1. Mix well\n", "2. Bake"]),
    ("今日は晴れです。明日は雨です。", ["今日は晴れです。", "明日は雨です。"]),
    ("Wait... what? No", ["Wait... ", "what? ", "No"]),
    ("no end", ["no end"]),
])
def test_sentence_splitter(text, sentences):
    splitter = proto.SentenceSplitter()
    out = [s for ch in text for s in splitter.feed(ch)]
    rest = splitter.flush()
    assert out + ([rest] if rest else []) == sentences


def test_sentence_splitter_is_independent_of_delta_boundaries():
    text = "First one. Second, with 2.5 units! Third?\nFourth line\n\nFifth: e.g. this. End"
    reference = proto.SentenceSplitter()
    expected = reference.feed(text) + [reference.flush()]
    rng = random.Random(0)
    for _ in range(50):
        splitter, out, i = proto.SentenceSplitter(), [], 0
        while i < len(text):
            j = i + rng.randint(1, 6)
            out += splitter.feed(text[i:j])
            i = j
        out.append(splitter.flush())
        assert out == expected and "".join(out) == text


# -- reply payloads and JSON schemas ------------------------------------------

SCHEMA_NAMES = ("request", "chunk", "final", "error", "status", "cancel")


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_examples_validate(name):
    schema = load_schema(name)
    assert schema["$schema"].endswith("2020-12/schema") and schema["examples"]
    for example in schema["examples"]:
        assert schema_errors(example, schema) == []


def test_request_schema_examples_are_accepted_by_the_protocol():
    for example in load_schema("request")["examples"]:
        parse(example)


def test_request_schema_agrees_with_the_protocol():
    schema = load_schema("request")
    assert set(schema["properties"]) == proto.REQUEST_FIELDS
    for name in sorted(set(BAD) - SCHEMA_BLIND):
        assert schema_errors(json.loads(BAD[name]), schema), f"schema accepts {name!r}"
    assert proto.ERROR_CODES == tuple(load_schema("error")["properties"]["error"]["properties"]["code"]["enum"])


def test_reply_builders_match_their_schemas():
    usage = {"prompt_tokens": 3, "cached_prompt_tokens": 0, "completion_tokens": 2, "ttft_s": 0.01,
             "decode_tokens_per_s": 50.0}
    cases = [
        ("chunk", proto.chunk_payload("a", 0, "Hi")),
        ("final", proto.final_payload("a", "Hi", "stop", usage)),
        ("error", proto.error_payload("a", proto.BUSY, "queue is full")),
        ("error", proto.error_payload(None, proto.BAD_REQUEST, "not JSON")),
        ("status", proto.status_payload("offline")),
    ]
    for name, payload in cases:
        assert schema_errors(json.loads(proto.encode(payload)), load_schema(name)) == [], name
    assert schema_errors(proto.error_payload("a", "nope", "x"), load_schema("error"))


def _doc_kind(example: dict) -> str:
    if "prompt" in example or "messages" in example:
        return "request"
    for key, kind in (("delta", "chunk"), ("done", "final"), ("status", "error"), ("state", "status")):
        if key in example:
            return kind
    return "cancel"


def test_docs_json_examples_validate_against_the_schemas():
    blocks = re.findall(r"```json\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) >= 6
    kinds = set()
    for block in blocks:
        example = json.loads(block)
        kind = _doc_kind(example)
        kinds.add(kind)
        assert schema_errors(example, load_schema(kind)) == [], block
        if kind == "request":
            parse(example)
    assert kinds == set(SCHEMA_NAMES)

"""One message check for every front: MQTT, OpenAI and Ollama refuse the same messages with the
same limit and the same words (edgellm/messages.py), and each names a refused parameter its way."""
from __future__ import annotations

import httpx
import pytest

from edgellm.errors import GenerationError
from edgellm.messages import FIELDS, MAX_CALLS, MAX_MESSAGES, check_messages
from http_helpers import serving
from mqtt_helpers import Probe, connection, load_schema, running_service

TOO_MANY = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(MAX_MESSAGES + 1)]
UNKNOWN_KEY = [{"role": "user", "content": "hi", "weight": 2}]


def _refusals(http_url: str, probe: Probe, messages: list[dict], rid: str) -> dict[str, str]:
    """The error message each front answers `messages` with (MQTT, OpenAI, Ollama)."""
    probe.publish("edgellm/dev1/request", {"id": rid, "messages": messages, "max_tokens": 1})
    mqtt = probe.replies(rid, timeout=30)[-1]
    assert mqtt.get("status") == "error" and mqtt["error"]["code"] == "bad_request", mqtt
    out = {"mqtt": mqtt["error"]["message"]}
    for front, path in (("openai", "/v1/chat/completions"), ("ollama", "/api/chat")):
        response = httpx.post(http_url + path, json={"messages": messages, "max_tokens": 1, "stream": False},
                              timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        if front == "openai":
            assert error["param"] == "messages"
            error = error["message"]
        out[front] = error
    return out


def test_every_front_refuses_the_same_messages_with_the_same_limit(model, broker):
    """Before: MQTT refused 257 messages and unknown keys, the HTTP fronts took both."""
    with serving(model) as http, running_service(model, connection(broker.url)):
        probe = Probe(connection(broker.url), "probe-msgs", topics=("edgellm/dev1/response/#",))
        try:
            many = _refusals(http.url, probe, TOO_MANY, "many")
            keys = _refusals(http.url, probe, UNKNOWN_KEY, "keys")
        finally:
            probe.close()
    assert set(many.values()) == {f"messages has {MAX_MESSAGES + 1} entries, limit is {MAX_MESSAGES}"}, many
    assert len(set(keys.values())) == 1 and "messages[0] has unknown field 'weight'" in keys["mqtt"], keys


def test_checked_messages_are_not_checked_again():
    checked = check_messages([{"role": "user", "content": "hi"}])
    assert check_messages(checked) is checked
    with pytest.raises(GenerationError, match=r"^messages\[0\]\.name must be a string") as refused:
        check_messages([{"role": "user", "content": "hi", "name": 3}])
    assert refused.value.field == "messages"


def test_each_front_spells_a_refused_parameter_its_way(model):
    """The error carries the parameter (`field`); OpenAI names the budget as the request did,
    Ollama as its option, without reading the field back out of the message."""
    with serving(model, max_tokens=8) as http:
        def error(path: str, body: dict) -> dict:
            response = httpx.post(http.url + path, json={"messages": [{"role": "user", "content": "hi"}],
                                                         "stream": False, **body}, timeout=30)
            assert response.status_code == 400, response.text
            return response.json()["error"]

        late = error("/v1/chat/completions", {"max_completion_tokens": 9})  # refused by the service's ceiling
        assert late["param"] == "max_completion_tokens"
        assert late["message"] == "max_completion_tokens is 9, this service allows at most 8"
        early = error("/v1/chat/completions", {"max_tokens": 0})
        assert early["param"] == "max_tokens" and early["message"].startswith("max_tokens must be an integer")
        assert error("/api/chat", {"options": {"num_predict": 9}}) == \
            "options.num_predict is 9, this service allows at most 8"
        assert error("/api/chat", {"options": {"repeat_last_n": 0.5}}).startswith("options.repeat_last_n must be")


def test_the_published_request_schema_holds_the_same_limits():
    messages = load_schema("request")["properties"]["messages"]
    assert messages["maxItems"] == MAX_MESSAGES and set(messages["items"]["properties"]) == FIELDS
    assert messages["items"]["properties"]["tool_calls"]["maxItems"] == MAX_CALLS

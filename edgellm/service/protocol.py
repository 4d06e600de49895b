"""The MQTT wire protocol: request validation, reply payloads, sentence splitting.

Pure functions, no broker: everything a device can send is checked here, so the
server only ever sees a well-formed `Request`. Anything else becomes a
`RequestError` whose `code` is stable and goes on the wire.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import RequestError

BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
BUSY = "busy"
CANCELLED = "cancelled"
INTERNAL = "internal"
ERROR_CODES = (BAD_REQUEST, TOO_LARGE, BUSY, CANCELLED, INTERNAL)

DEFAULT_MAX_PAYLOAD = 64 * 1024
FINISH_REASONS = ("stop", "length", "cancelled")
ROLES = ("system", "user", "assistant", "tool")

# Ids end up in topic names (`.../response/{id}`): no '/', '+', '#' or spaces.
_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
MAX_MESSAGES = 256
MAX_STOP = 8
MAX_STOP_LEN = 128
MAX_LOGIT_BIAS = 300

# name -> (accepted types, min, max, min inclusive); bool is refused separately
# because it is an int in Python but never a number on the wire.
_NUMBERS: dict[str, tuple[tuple[type, ...], float, float, bool]] = {
    "max_tokens": ((int,), 1, 1 << 20, True),
    "temperature": ((int, float), 0.0, 5.0, True),
    "top_k": ((int,), 0, 1 << 20, True),
    "top_p": ((int, float), 0.0, 1.0, False),
    "min_p": ((int, float), 0.0, 1.0, True),
    "repetition_penalty": ((int, float), 0.0, 10.0, False),
    "presence_penalty": ((int, float), -2.0, 2.0, True),
    "frequency_penalty": ((int, float), -2.0, 2.0, True),
    "seed": ((int,), 0, (1 << 63) - 1, True),
}
# Wire names that differ from `Model.stream` keyword names.
_PARAM_NAMES = {"max_tokens": "max_new_tokens"}
REQUEST_FIELDS = frozenset(
    {"id", "prompt", "messages", "stream", "reply_to", "stop", "logit_bias", *_NUMBERS}
)


@dataclass(frozen=True)
class Request:
    """A validated request; `params` are keyword arguments for `Model.stream`."""

    id: str
    prompt: str | list[dict[str, str]]
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool | str = True
    reply_to: str | None = None


def _bad(message: str) -> RequestError:
    return RequestError(BAD_REQUEST, message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Any:
    """Bytes -> JSON value, refusing oversized payloads before parsing them."""
    if len(payload) > max_bytes:
        raise RequestError(TOO_LARGE, f"payload is {len(payload)} bytes, limit is {max_bytes}")
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise _bad("payload is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise _bad(f"payload is not valid JSON ({str(exc)[:80]})") from None


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def valid_topic(value: Any) -> bool:
    """A topic a reply may be published to: no wildcards, not a `$` system topic."""
    return (
        isinstance(value, str)
        and 0 < len(value.encode("utf-8")) <= 1024
        and not value.startswith("$")
        and not any(c in value for c in "+#\0")
    )


def peek(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> tuple[str | None, str | None]:
    """Best-effort (id, reply_to) of a request that failed validation, to route its error."""
    try:
        data = decode_json(payload, max_bytes)
    except RequestError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    rid = data.get("id") if valid_id(data.get("id")) else None
    reply_to = data.get("reply_to") if valid_topic(data.get("reply_to")) else None
    return rid, reply_to


def _number(name: str, value: Any) -> int | float:
    types, low, high, low_inclusive = _NUMBERS[name]
    if isinstance(value, bool) or not isinstance(value, types):
        kind = "an integer" if types == (int,) else "a number"
        raise _bad(f"field {name!r} must be {kind}, got {type(value).__name__}")
    if value > high or value < low or (value == low and not low_inclusive):
        bracket = "[" if low_inclusive else "("
        raise _bad(f"field {name!r} is {value}, must be in {bracket}{low}, {high}]")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _bad("field 'messages' must be a non-empty list")
    if len(value) > MAX_MESSAGES:
        raise _bad(f"field 'messages' has {len(value)} entries, limit is {MAX_MESSAGES}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise _bad(f"messages[{i}] must be an object with exactly 'role' and 'content'")
        if message["role"] not in ROLES:
            raise _bad(f"messages[{i}].role {message['role']!r} is not one of {list(ROLES)}")
        if not isinstance(message["content"], str):
            raise _bad(f"messages[{i}].content must be a string")
    if not any(m["content"].strip() for m in value):
        raise _bad("field 'messages' has no content")
    return [dict(m) for m in value]


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("field 'stop' must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_LEN for s in stops):
        raise _bad(f"field 'stop' allows {MAX_STOP} strings of at most {MAX_STOP_LEN} characters")
    return stops


def _logit_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise _bad(f"field 'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} entries")
    bias = {}
    for key, b in value.items():
        if not key.isdigit() or len(key) > 9:
            raise _bad(f"logit_bias key {key[:20]!r} is not a token id")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise _bad(f"logit_bias[{key}] must be a number in [-100, 100]")
        bias[int(key)] = float(b)
    return bias


def parse_request(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Request:
    """Validate a request payload strictly: unknown fields are errors, not ignored."""
    data = decode_json(payload, max_bytes)
    if not isinstance(data, dict):
        raise _bad(f"request must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - REQUEST_FIELDS)
    if unknown:
        raise _bad(f"unknown field {unknown[0][:40]!r}")
    if "id" not in data:
        raise _bad("field 'id' is required")
    if not valid_id(data["id"]):
        raise _bad("field 'id' must be 1-128 characters of A-Z a-z 0-9 _ . : @ -")
    if ("prompt" in data) == ("messages" in data):
        raise _bad("exactly one of 'prompt' and 'messages' is required")
    if "prompt" in data:
        prompt = data["prompt"]
        if not isinstance(prompt, str):
            raise _bad(f"field 'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise _bad("field 'prompt' is empty")
    else:
        prompt = _messages(data["messages"])
    stream = data.get("stream", True)
    if not (isinstance(stream, bool) or stream == "sentence"):
        raise _bad("field 'stream' must be true, false or \"sentence\"")
    reply_to = data.get("reply_to")
    if reply_to is not None and not valid_topic(reply_to):
        raise _bad("field 'reply_to' must be a topic without wildcards, not starting with '$'")
    params: dict[str, Any] = {
        _PARAM_NAMES.get(name, name): _number(name, data[name]) for name in _NUMBERS if name in data
    }
    if "stop" in data:
        params["stop"] = _stop(data["stop"])
    if "logit_bias" in data:
        params["logit_bias"] = _logit_bias(data["logit_bias"])
    return Request(id=data["id"], prompt=prompt, params=params, stream=stream, reply_to=reply_to)


def parse_cancel(payload: bytes) -> str:
    """A cancel payload {"id": ...} -> the id to cancel."""
    data = decode_json(payload, 1024)
    if not isinstance(data, dict) or set(data) != {"id"} or not valid_id(data["id"]):
        raise _bad("cancel must be an object with exactly one valid 'id'")
    return data["id"]


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def chunk_payload(rid: str, seq: int, delta: str) -> dict[str, Any]:
    return {"id": rid, "seq": seq, "delta": delta}


def final_payload(rid: str, text: str, finish_reason: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "done": True, "text": text, "finish_reason": finish_reason, "usage": usage}


def error_payload(rid: str | None, code: str, message: str) -> dict[str, Any]:
    return {"id": rid, "status": "error", "error": {"code": code, "message": message}}


def status_payload(state: str, **fields: Any) -> dict[str, Any]:
    return {"state": state, **fields}


# A sentence ends at . ! ? … (plus closing quotes/brackets) and white space, at a
# CJK full stop, or at a line break; it is cut only once the next sentence begins,
# so all the white space in between stays with it whatever the delta boundaries.
_SENTENCE_END = re.compile(r"(?:[.!?…]+[\"'”’)\]]*\s+|[。！？]+[」』”）]*\s*|\n\s*)(?=\S)")
# "Dr. Smith" or "e.g. this" must not cut a sentence a TTS engine then reads in two breaths.
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "vs", "etc", "e.g", "i.e", "approx", "no", "fig"}
)


class SentenceSplitter:
    """Regroups streamed text deltas into whole sentences for a TTS engine.

    `feed` returns the sentences completed so far (each with its trailing white
    space, so they concatenate back to the input); `flush` returns the rest.
    A sentence is released when the first character of the next one arrives.
    """

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, delta: str) -> list[str]:
        self._buffer += delta
        sentences = []
        start = 0
        for match in _SENTENCE_END.finditer(self._buffer):
            if self._is_abbreviation(self._buffer[start : match.start() + 1]):
                continue
            sentence = self._buffer[start : match.end()]
            if sentence.strip():
                sentences.append(sentence)
                start = match.end()
        self._buffer = self._buffer[start:]
        return sentences

    def flush(self) -> str:
        rest, self._buffer = self._buffer, ""
        return rest

    @staticmethod
    def _is_abbreviation(text: str) -> bool:
        """True when `text` ends with "X." where X is an initial, a known abbreviation
        or a list number ("1. First step")."""
        if not text.endswith("."):
            return False
        words = text[:-1].split()
        if not words:
            return False
        word = words[-1].lstrip("([\"'“‘").lower()
        if len(words) == 1 and word.isdigit():
            return True
        return len(word) == 1 and word.isalpha() or word in _ABBREVIATIONS


@dataclass(frozen=True)
class Topics:
    """The topic names of one device: `{prefix}/{device}/request|cancel|status|response/{id}`."""

    prefix: str = "edgellm"
    device: str = "edge"

    def __post_init__(self) -> None:
        if not valid_topic(self.prefix) or self.prefix.endswith("/"):
            raise ValueError(f"topic prefix {self.prefix!r} must be a topic without wildcards or a trailing '/'")
        if not valid_topic(self.device) or "/" in self.device:
            raise ValueError(f"device id {self.device!r} must be one topic level: no '/', '+', '#'")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def request(self) -> str:
        return f"{self.base}/request"

    @property
    def cancel(self) -> str:
        return f"{self.base}/cancel"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    def response(self, rid: str) -> str:
        return f"{self.base}/response/{rid}"

    @property
    def errors(self) -> str:
        """Where errors go when a request is too broken to name its own reply topic."""
        return f"{self.base}/errors"

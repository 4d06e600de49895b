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

from .. import netjson
from ..errors import GenerationError, RequestError
from ..messages import check_messages
from ..params import BY_WIRE, WIRE, from_wire, spelled

BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
BUSY = "busy"
CANCELLED = "cancelled"
INTERNAL = "internal"
FORBIDDEN = "forbidden"  # a cancel that does not carry the request's cancel_key
ERROR_CODES = (BAD_REQUEST, TOO_LARGE, BUSY, CANCELLED, INTERNAL, FORBIDDEN)

DEFAULT_MAX_PAYLOAD = 64 * 1024
FINISH_REASONS = ("stop", "length", "cancelled")

# Ids end up in topic names (`.../response/{id}`): no '/', '+', '#' or spaces.
_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
MAX_CANCEL_KEY = 128
# Correlation Data is echoed in every chunk: a large one would multiply the outgoing traffic.
MAX_CORRELATION = 256
# Room for the topic, properties and a request a few times over the limit.
PACKET_HEADROOM = 64 * 1024


def packet_limit(max_payload: int) -> int:
    """The most of one MQTT packet the service holds (see `bounded`): a larger one keeps only its
    first this many bytes, the rest discarded as it arrives, and is answered `too_large`."""
    return 4 * max_payload + PACKET_HEADROOM


# Generation parameters come from their one declaration (edgellm/params.py).
REQUEST_FIELDS = frozenset({"id", "prompt", "messages", "stream", "reply_to", "cancel_key", *BY_WIRE})


@dataclass(frozen=True)
class Request:
    """A validated request; `params` are keyword arguments for `Model.stream`."""

    id: str
    prompt: str | list[dict[str, str]]
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool | str = True
    reply_to: str | None = None
    cancel_key: str | None = None


def _bad(message: str) -> RequestError:
    return RequestError(BAD_REQUEST, message)


def _loads(payload: bytes, max_bytes: int) -> Any:
    if len(payload) > max_bytes:
        raise RequestError(TOO_LARGE, f"payload is {len(payload)} bytes, limit is {max_bytes}")
    try:
        return netjson.loads(payload)
    except UnicodeDecodeError:
        raise _bad("payload is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise _bad(f"payload is not valid JSON ({str(exc)[:80]})") from None


def decode_json(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Any:
    """Bytes -> JSON value, refusing oversized payloads before parsing them.

    Strings must be valid Unicode: a lone surrogate (`"\\ud800"`) parses as JSON but can
    be neither encoded for the tokenizer nor published again, so it is refused here.
    """
    data = _loads(payload, max_bytes)
    if b"\\u" in payload and (where := netjson.surrogate_at(data)) is not None:
        raise _bad(f"{where} holds a lone surrogate (\\ud800-\\udfff), which is not text")
    return data


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def valid_topic(value: Any) -> bool:
    """A topic a reply may be published to: no wildcards, not a `$` system topic."""
    return (
        isinstance(value, str)
        and netjson.encodable(value)
        and 0 < len(value.encode("utf-8")) <= 1024
        and not value.startswith("$")
        and not any(c in value for c in "+#\0")
    )


def peek(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> tuple[str | None, str | None]:
    """Best-effort (id, reply_to) of a request that failed validation, to route its error."""
    try:
        data = _loads(payload, max_bytes)
    except RequestError as exc:
        return (peek_id(payload) if exc.code == TOO_LARGE else None), None
    if not isinstance(data, dict):
        return None, None
    rid = data.get("id") if valid_id(data.get("id")) else None
    reply_to = data.get("reply_to") if valid_topic(data.get("reply_to")) else None
    return rid, reply_to


def peek_id(payload: bytes) -> str | None:
    """The id of a request too large to parse, from its first bytes, to route `too_large`."""
    match = _HEAD_ID.search(payload[:4096])
    return match.group(1).decode() if match else None


_HEAD_ID = re.compile(rb'"id"\s*:\s*"(' + _ID.pattern.encode() + rb')"')


def bad_params(exc: GenerationError) -> RequestError:
    """A parameter refused (here, by the engine or on the worker), its field spelled as the wire does."""
    return _bad(spelled(exc, WIRE))


def _params(data: dict[str, Any]) -> dict[str, Any]:
    """The generation parameters of a request, by `Model.stream` keyword name."""
    try:
        return from_wire(data)
    except GenerationError as exc:
        raise bad_params(exc) from None


def _messages(value: Any) -> list[dict[str, Any]]:
    try:
        return check_messages(value)
    except GenerationError as exc:
        raise _bad(str(exc)) from None


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
    cancel_key = data.get("cancel_key")
    if cancel_key is not None:
        _check_key(cancel_key, "field 'cancel_key'")
    params = _params(data)
    return Request(id=data["id"], prompt=prompt, params=params, stream=stream, reply_to=reply_to,
                   cancel_key=cancel_key)


# An embed request (`{base}/embed`): texts in, one vector each out, on the request's reply route.
EMBED_FIELDS = frozenset({"id", "input", "reply_to"})
MAX_EMBED_TEXTS = 32  # a vector is ~8 KB of JSON at 384 dimensions: a reply stays within a few hundred KB


@dataclass(frozen=True)
class EmbedRequest:
    id: str
    texts: list[str]
    reply_to: str | None = None


def parse_embed(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> EmbedRequest:
    """Validate an embed request: {"id", "input": a string or up to MAX_EMBED_TEXTS strings, "reply_to"?}."""
    data = decode_json(payload, max_bytes)
    if not isinstance(data, dict):
        raise _bad(f"request must be a JSON object, got {type(data).__name__}")
    if unknown := sorted(set(data) - EMBED_FIELDS):
        raise _bad(f"unknown field {unknown[0][:40]!r}")
    if not valid_id(data.get("id")):
        raise _bad("field 'id' must be 1-128 characters of A-Z a-z 0-9 _ . : @ -")
    texts = data.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _bad("field 'input' must be a string or a non-empty list of strings")
    if len(texts) > MAX_EMBED_TEXTS:
        raise _bad(f"field 'input' holds {len(texts)} texts, at most {MAX_EMBED_TEXTS} a request")
    reply_to = data.get("reply_to")
    if reply_to is not None and not valid_topic(reply_to):
        raise _bad("field 'reply_to' must be a topic without wildcards, not starting with '$'")
    return EmbedRequest(data["id"], texts, reply_to)


def _check_key(value: Any, name: str) -> None:
    if not (isinstance(value, str) and 8 <= len(value) <= MAX_CANCEL_KEY and value.isascii() and value.isprintable()):
        raise _bad(f"{name} must be a string of 8-{MAX_CANCEL_KEY} printable ASCII characters")


def parse_cancel(payload: bytes) -> tuple[str, str]:
    """A cancel payload {"id": ..., "cancel_key": ...} -> (id, key).

    A broker never says who published, so the key the request set is the only proof
    that a cancel comes from the device that asked."""
    data = decode_json(payload, 1024)
    if not isinstance(data, dict) or set(data) != {"id", "cancel_key"} or not valid_id(data["id"]):
        raise _bad("cancel must be an object with exactly a valid 'id' and the request's 'cancel_key'")
    _check_key(data["cancel_key"], "cancel_key")
    return data["id"], data["cancel_key"]


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def chunk_payload(rid: str, seq: int, delta: str, reasoning: str = "",
                  tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`reasoning` and `tool_calls` (OpenAI's deltas) are sent only when there are some."""
    payload: dict[str, Any] = {"id": rid, "seq": seq, "delta": delta}
    if reasoning:
        payload["reasoning"] = reasoning
    if tool_calls:
        payload["tool_calls"] = tool_calls
    return payload


def final_payload(rid: str, text: str, finish_reason: str, usage: dict[str, Any], incomplete: bool = False,
                  reasoning: str = "", tool_calls: list[dict[str, Any]] | None = None,
                  citations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`incomplete` (sent only when true): the text stopped short of the request's
    response_format, grammar or forced call, so it will not validate. `reasoning`,
    `tool_calls` and `citations` (a retrieval request's sources) are sent only when there are some."""
    payload = {"id": rid, "done": True, "text": text, "finish_reason": finish_reason, "usage": usage}
    if incomplete:
        payload["incomplete"] = True
    if reasoning:
        payload["reasoning"] = reasoning
    if tool_calls:
        payload["tool_calls"] = tool_calls
    if citations:
        payload["citations"] = citations
    return payload


def error_payload(rid: str | None, code: str, message: str) -> dict[str, Any]:
    return {"id": rid, "status": "error", "error": {"code": code, "message": message}}


def restarted(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` (a chunk, final or error) as the first reply of an answer that starts over: the
    broker handed the request again after the service that had it died, so whatever the device
    received of it before (chunks from `seq` 0 on) is void."""
    return {**payload, "restart": True}


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
    def embed(self) -> str:
        return f"{self.base}/embed"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    def response(self, rid: str) -> str:
        return f"{self.base}/response/{rid}"

    def reply_problem(self, topic: str) -> str | None:
        """Why a device may not have replies published to `topic`, or None if it may.

        Under our prefix only response topics are allowed, of any device: a request that
        names another service's request, cancel, status or error topic would let one device
        inject into, or spoof, what other devices read."""
        if not valid_topic(topic):
            return "must be a topic without wildcards or NUL, not starting with '$', at most 1024 bytes"
        levels = topic.split("/")
        prefix = self.prefix.split("/")
        if levels[: len(prefix)] == prefix:
            rest = levels[len(prefix):]
            if len(rest) < 3 or rest[1] != "response":
                return f"is an edgellm control topic; under {self.prefix}/ only {self.prefix}/DEVICE/response/... may be used"
        return None

    @property
    def errors(self) -> str:
        """Where errors go when a request is too broken to name its own reply topic."""
        return f"{self.base}/errors"

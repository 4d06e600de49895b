"""JSON that arrives from the network, parsed within limits: every front (MQTT, HTTP) and every
JSON string a request carries (a tool call's arguments) goes through `loads`.

The limits are checked before or instead of anything that could blow up: nesting is counted
on the raw text before the recursive parser sees it (100,000 `[` otherwise end in a
RecursionError, wherever the parse happens), an integer literal is refused by its digit
count before it is converted, and NaN/Infinity are not JSON. Every refusal is a ValueError
(`json.JSONDecodeError` for bad syntax) whose message says what was wrong in one line.
"""
from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 100  # arrays and objects inside each other: real requests (tools, schemas) nest < 20
MAX_INT_DIGITS = 4300  # Python's own cap on int(str) (sys.get_int_max_str_digits), said in our words

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def nesting(data: bytes) -> int:
    """How deep arrays and objects nest in JSON text, brackets inside strings not counted."""
    brackets = np.frombuffer(_STRING.sub(b"", data).translate(None, _NOT_BRACKET), np.uint8)
    # '[' 0x5b and '{' 0x7b have bit 1 set, ']' 0x5d and '}' 0x7d do not: +1 opens, -1 closes.
    steps = (brackets >> 1 & 1).astype(np.int32) * 2 - 1
    return int(np.cumsum(steps).max(initial=0))


def _int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {digits} digits is out of range (at most {MAX_INT_DIGITS})")
    return int(text)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice is refused: parsers disagree on which one wins (`{"id": "a", "id": "b"}`
    would be one request to a bridge or a logger and another to us)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice[:40]!r} appears twice")
    return data


def loads(data: bytes | str) -> Any:
    """Parse JSON text within the limits above; UnicodeDecodeError for bytes that are not UTF-8."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    # Fewer brackets than the limit cannot nest deeper than it: most requests skip the count.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and (levels := nesting(raw)) > MAX_DEPTH:
        raise ValueError(f"arrays and objects nest {levels} deep, more than the limit of {MAX_DEPTH}")
    text = data if isinstance(data, str) else data.decode("utf-8")
    return json.loads(text, parse_int=_int, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def encodable(text: str) -> bool:
    """Whether `text` is UTF-8 text (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def surrogate_at(data: Any) -> str | None:
    """Where the first string that cannot be UTF-8 encoded (a lone surrogate, `"\\ud800"`) is, as
    a JSON path; None if none. Such a string parses but can be neither tokenized nor sent again.

    Iterative: nesting is bounded by `loads`, not by this walk."""
    stack: list[tuple[str, Any]] = [("$", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if not encodable(value):
                return where
        elif isinstance(value, dict):
            for key, item in value.items():
                if not encodable(key):
                    return f"a key of {where}"
                stack.append((f"{where}.{key[:40]}", item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return None

"""Sensor events: validation, and coalescing storms into a bounded queue. Pure: no broker, no clock.

A failing bearing does not send one anomaly, it sends one a second for hours. One explanation
per machine and sensor per window is what a technician can read and what the model can keep up
with; when even that is too much, the oldest waiting explanation is the one to drop, since a
newer one covers a later state of the same fault.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..errors import RequestError
from ..service import protocol as proto

# Machine and sensor names become topic levels of the output topic: no '/', '+', '#'.
_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
FIELDS = frozenset({"id", "machine", "sensor", "value", "baseline", "unit", "timestamp", "context"})
MAX_CONTEXT = 1000
MAX_IDS = 32  # ids listed per explanation; `count` says how many events it covers


@dataclass(frozen=True)
class Event:
    id: str
    machine: str
    sensor: str
    value: float
    baseline: float
    unit: str
    timestamp: str | float
    context: str | None = None


def _bad(message: str) -> RequestError:
    return RequestError(proto.BAD_REQUEST, message)


def _number(data: dict[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"field {key!r} must be a number, got {type(value).__name__}")
    return value


def _text(data: dict[str, Any], key: str, low: int, high: int) -> str:
    value = data[key]
    if not isinstance(value, str) or not low <= len(value) <= high or not value.isprintable():
        raise _bad(f"field {key!r} must be a string of {low}-{high} printable characters")
    return value


def parse_event(payload: bytes, max_bytes: int) -> Event:
    """One event payload -> Event; RequestError (`too_large` or `bad_request`) naming the field at
    fault. The size is checked before the payload is parsed."""
    data = proto.decode_json(payload, max_bytes)
    if not isinstance(data, dict):
        raise _bad(f"event must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise _bad(f"unknown field {unknown[0][:40]!r} (extra details go in 'context')")
    missing = sorted(FIELDS - {"id", "context"} - set(data))
    if missing:
        raise _bad(f"field {missing[0]!r} is required")
    for key in ("machine", "sensor"):
        if not isinstance(data[key], str) or not _NAME.fullmatch(data[key]):
            raise _bad(f"field {key!r} must be 1-64 characters of A-Z a-z 0-9 _ . : @ -")
    if "id" in data and not proto.valid_id(data["id"]):
        raise _bad("field 'id' must be 1-128 characters of A-Z a-z 0-9 _ . : @ -")
    timestamp = data["timestamp"]
    if not isinstance(timestamp, str):
        timestamp = _number(data, "timestamp")
    else:
        _text(data, "timestamp", 1, 64)
    context = data.get("context")
    if context is not None:
        if not isinstance(context, (str, dict)):
            raise _bad(f"field 'context' must be a string or an object, got {type(context).__name__}")
        context = context if isinstance(context, str) else json.dumps(context, ensure_ascii=False)
        if len(context) > MAX_CONTEXT:
            raise _bad(f"field 'context' is {len(context)} characters, limit is {MAX_CONTEXT}")
    return Event(
        id=data.get("id") or derived_id(data),
        machine=data["machine"], sensor=data["sensor"],
        value=_number(data, "value"), baseline=_number(data, "baseline"),
        unit=_text(data, "unit", 0, 16), timestamp=timestamp, context=context,
    )


def derived_id(data: dict[str, Any]) -> str:
    """An id for an event that has none: the same event (a QoS 1 redelivery, a replay) gets the same id."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "ev-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


@dataclass
class Group:
    """The events of one machine and sensor that one explanation covers."""

    first: Event
    opened: float
    due: float  # when it may be sent: the end of its window, or a retry's time
    last: Event = None  # type: ignore[assignment]
    count: int = 1
    low: float = 0.0
    high: float = 0.0
    ids: list[str] = field(default_factory=list)
    context: str | None = None

    def __post_init__(self) -> None:
        self.last = self.first
        self.low = self.high = self.first.value
        self.ids = [self.first.id]
        self.context = self.first.context

    @property
    def key(self) -> tuple[str, str]:
        return self.first.machine, self.first.sensor

    def add(self, event: Event) -> None:
        self.last = event
        self.count += 1
        self.low, self.high = min(self.low, event.value), max(self.high, event.value)
        if len(self.ids) < MAX_IDS:
            self.ids.append(event.id)
        self.context = event.context or self.context

    def variables(self) -> dict[str, Any]:
        """What the prompt template sees (the names are listed in docs/anomaly.md)."""
        last = self.last
        deviation = last.value - last.baseline
        return {
            "id": self.first.id, "machine": last.machine, "sensor": last.sensor, "unit": last.unit,
            "value": last.value, "baseline": last.baseline, "deviation": deviation,
            "deviation_pct": 100.0 * deviation / abs(last.baseline) if last.baseline else None,
            "timestamp": last.timestamp, "context": self.context, "count": self.count,
            "min_value": self.low, "max_value": self.high, "first_timestamp": self.first.timestamp,
            "last_timestamp": last.timestamp, "ids": list(self.ids),
        }

    def summary(self) -> dict[str, Any]:
        """What the published explanation says about the events it covers."""
        return {"count": self.count, "ids": list(self.ids), "min": self.low, "max": self.high,
                "baseline": self.last.baseline, "unit": self.last.unit,
                "first_timestamp": self.first.timestamp, "last_timestamp": self.last.timestamp}


class Coalescer:
    """Groups waiting to be explained, oldest first, at most `bound` of them.

    An event joins the waiting group of its machine and sensor while that group's window is
    open; otherwise it starts a new group, and the oldest group is dropped if that makes one
    too many. Not thread-safe: the caller holds its lock.
    """

    def __init__(self, window: float, bound: int) -> None:
        self.window = window
        self.bound = bound
        self._queue: deque[Group] = deque()
        self._open: dict[tuple[str, str], Group] = {}  # waiting groups whose window may still be open
        self.coalesced = 0  # events merged into an earlier event's explanation
        self.dropped = 0  # events whose group was dropped unexplained

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, event: Event, now: float) -> None:
        group = self._open.get((event.machine, event.sensor))
        if group is not None and now < group.opened + self.window:
            group.add(event)
            self.coalesced += 1
            return
        group = Group(event, opened=now, due=now + self.window)
        self._queue.append(group)
        self._open[group.key] = group
        self._bound()

    def requeue(self, group: Group, due: float) -> None:
        """Put a group the service could not take yet back in front, to send again at `due`."""
        group.due = due
        self._queue.appendleft(group)
        self._bound()

    def _bound(self) -> None:
        while len(self._queue) > self.bound:
            self._forget(old := self._queue.popleft())
            self.dropped += old.count

    def _forget(self, group: Group) -> None:
        if self._open.get(group.key) is group:
            del self._open[group.key]

    def pop_due(self, now: float) -> Group | None:
        """The oldest group if its time has come (windows are equally long, so it is due first)."""
        if not self._queue or self._queue[0].due > now:
            return None
        group = self._queue.popleft()
        self._forget(group)
        return group

    def next_due(self) -> float | None:
        return self._queue[0].due if self._queue else None

"""Which requests the MQTT service has seen before, so a device's retry is not generated twice.

(Which request runs next is the engine's `FairQueue`: a broker never tells a subscriber who
published, so there a device's "client" is the reply topic its request names.)
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable

ACTIVE = b""  # the request is queued or running: its replies are on their way


class RecentRequests:
    """The keys of recent requests and, once answered, their final reply (bounded in count and bytes).

    A device that lost its answer retries with the same id (docs/mqtt.md): it gets the
    stored final reply again instead of silence or a second generation.
    """

    def __init__(self, capacity: int, max_bytes: int = 4 << 20) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def claim(self, key: Hashable) -> bytes | None:
        """None if `key` is new (it is now ACTIVE); else ACTIVE or the stored final reply."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            self._entries[key] = ACTIVE
            self._evict()
            return None

    def finish(self, key: Hashable, final: bytes) -> None:
        with self._lock:
            if key not in self._entries:
                return
            self._bytes += len(final) - len(self._entries[key])
            self._entries[key] = final
            self._evict()

    def forget(self, key: Hashable) -> None:
        """A request refused as busy: the device may send the same id again later."""
        with self._lock:
            self._bytes -= len(self._entries.pop(key, b""))

    def _evict(self) -> None:
        while len(self._entries) > self.capacity or self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= len(old)

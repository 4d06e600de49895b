"""Which request runs next, and which were seen before: the service's two pieces of bookkeeping.

A broker never tells a subscriber who published, so a "client" here is the reply topic a
request names: devices that name their own reply topic each get a fair share of the queue,
and those that use the default topic share one.
"""
from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, Hashable, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Waiting items, served round-robin across clients, bounded in total and per client.

    One device flooding requests fills only its own share: the others' requests keep
    their turn instead of waiting behind the whole flood.
    """

    def __init__(self, capacity: int, per_client: int) -> None:
        self.capacity = capacity
        self.per_client = per_client
        self._waiting: OrderedDict[Hashable, deque[T]] = OrderedDict()
        self._size = 0
        self._closed = False
        self._ready = threading.Condition()

    def __len__(self) -> int:
        return self._size

    def put(self, client: Hashable, item: T) -> str | None:
        """Queue `item`; the reason it was refused, or None."""
        with self._ready:
            mine = self._waiting.get(client)
            if self._size >= self.capacity:
                return f"queue is full ({self.capacity} waiting); retry later"
            if mine is not None and len(mine) >= self.per_client:
                return f"this reply topic already has {self.per_client} requests waiting; retry later"
            self._waiting.setdefault(client, deque()).append(item)
            self._size += 1
            self._ready.notify()
            return None

    def get(self) -> T | None:
        """The next item in turn, blocking; None once closed."""
        with self._ready:
            while not self._waiting and not self._closed:
                self._ready.wait()
            if not self._waiting:
                return None
            client, items = next(iter(self._waiting.items()))
            item = items.popleft()
            self._size -= 1
            if items:
                self._waiting.move_to_end(client)  # its next item waits for every other client's turn
            else:
                del self._waiting[client]
            return item

    def close(self) -> None:
        """Wake the consumer: `get` returns what is left, then None."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()


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

"""The service's queue and its memory of recent requests, without a broker."""
from __future__ import annotations

import threading

from edgellm.engine import FairQueue
from edgellm.service.admission import ACTIVE, RecentRequests


def test_fair_queue_takes_turns_across_clients():
    q: FairQueue[str] = FairQueue(capacity=10, per_client=5)
    for i in range(4):
        assert q.put("flood", f"f{i}") is None
    assert q.put("quiet", "q0") is None
    assert q.put("other", "o0") is None
    order = [q.get() for _ in range(6)]
    # the flooding client's first request runs first, then every other client has its turn
    assert order == ["f0", "q0", "o0", "f1", "f2", "f3"]
    assert len(q) == 0


def test_fair_queue_bounds_the_total_and_each_client():
    q: FairQueue[int] = FairQueue(capacity=3, per_client=2)
    assert q.put("a", 1) is None and q.put("a", 2) is None
    assert "this client" in q.put("a", 3)
    assert q.put("b", 4) is None
    assert "queue is full" in q.put("c", 5)
    q.get()
    assert q.put("c", 5) is None


def test_fair_queue_get_blocks_until_an_item_or_close():
    q: FairQueue[int] = FairQueue(capacity=2, per_client=2)
    got = []
    consumer = threading.Thread(target=lambda: got.extend([q.get(), q.get()]))
    consumer.start()
    q.put("a", 7)
    q.close()
    consumer.join(5)
    assert not consumer.is_alive() and got == [7, None]


def test_recent_requests_replay_answers_and_stay_bounded():
    recent = RecentRequests(capacity=3, max_bytes=10)
    assert recent.claim("k1") is None
    assert recent.claim("k1") == ACTIVE
    recent.finish("k1", b"final")
    assert recent.claim("k1") == b"final"
    recent.forget("k2")  # unknown: nothing happens
    assert recent.claim("k2") is None
    recent.forget("k2")
    assert recent.claim("k2") is None  # forgotten (busy): a retry is new
    recent.finish("k2", b"0123456789")  # 15 bytes stored: over max_bytes, the oldest goes
    assert recent.claim("k1") is None
    for key in ("k3", "k4", "k5"):
        recent.claim(key)
    assert recent.claim("k2") is None  # evicted by count

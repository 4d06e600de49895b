"""Continuous batching: many requests decoding together over cache slots.

A `Scheduler` holds requests waiting for a slot and the sequences decoding in slots.
Each `step` first admits waiting requests into free slots (the slot whose cached ids
share the longest prefix with the prompt, else an empty or the least recently used
one; a longer prefix held by another slot is copied over) and prefills the rest of
each prompt on its slot alone, then feeds every decoding sequence its last token in
one batched forward. A request joins and leaves between steps, so a short
answer frees its slot for the next prompt while longer ones go on.

Each sequence sees exactly the rows of logits that `generate.stream_chunks` would
give it, so its tokens are the same as one at a time, on graphs where several rows
are computed as one row is (fp32; int4 MatMulNBits rounds several rows differently).
Speculation is not used here: a batched step feeds one token per sequence.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Hashable

import numpy as np

from .kvcache import pick_slot
from .params import GenerationParams
from .sequence import Chunk, Conventions, Sequence
from .session import BatchRunner, prefill
from .text import Tokenizer


@dataclass
class _Request:
    key: Hashable
    prompt: list[int]
    params: GenerationParams
    started: float


@dataclass
class _Active:
    key: Hashable
    seq: Sequence
    token: int = -1  # sampled, not yet fed


class Scheduler:
    """Requests in, (key, Chunk) pairs out, one `step` at a time; see the module docstring."""

    def __init__(self, runner: BatchRunner, tokenizer: Tokenizer, conventions: Conventions = Conventions()) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.conventions = conventions
        self.waiting: deque[_Request] = deque()
        self.active: dict[int, _Active] = {}
        self._used = [0] * len(runner.slots)  # when each slot last took a request; 0: never
        self._clock = 0

    def add(self, key: Hashable, prompt: list[int], params: GenerationParams, started: float | None = None) -> None:
        """Queue a request (FIFO); its chunks come out of `step` under `key`."""
        self.waiting.append(_Request(key, prompt, params, time.perf_counter() if started is None else started))

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def step(self) -> list[tuple[Hashable, Chunk]]:
        """Admit what fits, then one batched decode step; the chunks made ready, last chunks included."""
        out: list[tuple[Hashable, Chunk]] = []
        while self.waiting and len(self.active) < len(self.runner.slots):
            self._admit(self.waiting.popleft(), out)
        feeds = {}
        for slot, entry in list(self.active.items()):
            if entry.seq.check_cancel():
                self._finish(slot, out)  # the slot is free for the next step's admission
            else:
                feeds[slot] = entry.token
        if feeds:
            for slot, logits in self.runner.step(feeds).items():
                self._take(slot, logits, out)
        return out

    def _admit(self, request: _Request, out: list[tuple[Hashable, Chunk]]) -> None:
        free = sorted((s for s in range(len(self.runner.slots)) if s not in self.active), key=self._used.__getitem__)
        slot = pick_slot([r.tokens for r in self.runner.slots], request.prompt, free)
        self._clock += 1
        self._used[slot] = self._clock
        runner = self.runner.slots[slot]
        cached = self.runner.reuse(slot, request.prompt)
        seq = Sequence(request.prompt, request.params, self.tokenizer, capacity=runner.capacity,
                       vocab_size=runner.vocab_size, cached=cached, started=request.started,
                       conventions=self.conventions)
        self.active[slot] = _Active(request.key, seq)
        if seq.check_cancel():
            self._finish(slot, out)
            return
        self._take(slot, prefill(runner.forward, request.prompt[cached:]), out)

    def _take(self, slot: int, logits: np.ndarray, out: list[tuple[Hashable, Chunk]]) -> None:
        entry = self.active[slot]
        entry.token = entry.seq.sample(logits)
        if (chunk := entry.seq.append(entry.token)) is not None:
            out.append((entry.key, chunk))
        if entry.seq.finish_reason is not None:
            self._finish(slot, out)

    def _finish(self, slot: int, out: list[tuple[Hashable, Chunk]]) -> None:
        entry = self.active.pop(slot)
        out.append((entry.key, entry.seq.finish()))

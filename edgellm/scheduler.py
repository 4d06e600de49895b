"""The decode loop: every request, one at a time or many together, every graph kind.

A `Scheduler` holds requests waiting for a slot and the sequences in slots. Its slots are
a `BatchRunner`'s (cache slots of a fast graph with a batch dimension, one batched step for
all of them) or `OneSlot`, a batch-1 runner of any graph (generic, openvino, qnn, or a fast
one served alone) as a single slot. The Python API (`Model.stream`, `generate`,
`generate_many`) and the engine behind every front drive it the same way: `add`, then
`step` until it is not `busy`.

Each `step` feeds prompts still being prefilled, up to `prefill_budget` tokens in all
(`PREFILL_CHUNK` by default), each on its slot alone (onnxruntime's attention takes
several new tokens only for a batch of one): first those already in slots, then
waiting requests admitted into free slots (the slot whose cached ids share the
longest prefix with the prompt, else an empty or the least recently used one; a
longer prefix held by another slot is copied over). Only rows of the request's own scope
(tenant and cache salt) count, and a declared shared prefix is restored from its copy
(`caches.visible`, `SharedPrefixes`). Then every decoding sequence gets its last token in
one batched forward. A long prompt thus joins a piece per step while the others keep
decoding, instead of stalling them for its whole prefill, and a short answer frees its
slot for the next prompt while longer ones go on. Cutting a prompt by the budget gives
the pieces `runner.prefill` gives one request, so a prompt's last logits always come
from a several-row piece (int4 MatMulNBits rounds a one-row step differently).

A sequence decoding alone speculates when its request asks (`speculate.drafter_for`:
prompt lookup or a draft model): its token and draft are verified in one forward on its
slot and the cache rewound to what was accepted. A batched step feeds one token per
sequence, as onnxruntime's attention verifies several tokens only for a batch of one.
Each sequence sees the rows of logits it would see alone, so its tokens are the same as
one at a time on graphs where several rows are computed as one row is (fp32).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Iterator, Protocol, Sequence as Ids

import numpy as np

from .errors import GenerationError
from .params import GenerationParams
from .runtime.caches import Scope, SharedPrefixes, pick_slot, visible
from .runtime.runner import PREFILL_CHUNK, OneTokenRunner, Runner, piece
from .sequence import Chunk, Conventions, Sequence
from .speculate import drafter_for
from .text import Tokenizer

SlotRunner = Runner | OneTokenRunner


class Slots(Protocol):
    """What the scheduler runs on: batch-1 runners, one per slot (prefill, drafts), and a step
    that feeds one token to each of several slots (`runtime.runner.BatchRunner`, `OneSlot`)."""

    slots: list[SlotRunner]

    def reuse(self, slot: int, ids: Ids[int], scope: Scope = Scope(),
              shared: SharedPrefixes | None = None) -> int: ...

    def step(self, feeds: dict[int, int]) -> dict[int, np.ndarray]: ...


class OneSlot:
    """A batch-1 runner as the scheduler's only slot, for a graph that cannot batch (or a fast
    one served alone): its step is the runner's one-token forward, its reuse the runner's."""

    def __init__(self, runner: SlotRunner) -> None:
        self.slots = [runner]

    def reuse(self, slot: int, ids: Ids[int], scope: Scope = Scope(), shared: SharedPrefixes | None = None) -> int:
        return self.slots[slot].reuse(ids, scope, shared)

    def step(self, feeds: dict[int, int]) -> dict[int, np.ndarray]:
        return {slot: self.slots[slot].forward([token]) for slot, token in feeds.items()}


@dataclass
class _Request:
    key: Hashable
    prompt: list[int]
    params: GenerationParams
    started: float
    scope: Scope
    sources: tuple[Any, ...] = ()  # retrieval's citations, for the final Result


@dataclass
class _Active:
    key: Hashable
    seq: Sequence
    pending: list[int]  # prompt ids not yet prefilled
    token: int = -1  # sampled, not yet fed


# What a step gives: (key, Chunk), or (key, GenerationError) for a request that failed on its
# own (its grammar past a parser limit) and ended there, while the others go on.
Events = list[tuple[Hashable, "Chunk | GenerationError"]]


class Scheduler:
    """Requests in, (key, Chunk) pairs out, one `step` at a time; see the module docstring.
    `draft`: the draft model's runner, for requests with speculative "draft_model"."""

    def __init__(self, runner: Slots, tokenizer: Tokenizer, conventions: Conventions = Conventions(),
                 prefill_budget: int = PREFILL_CHUNK, shared: SharedPrefixes | None = None,
                 draft: Runner | None = None) -> None:
        if prefill_budget < 1:
            raise ValueError(f"prefill_budget must be >= 1, got {prefill_budget}")
        self.runner = runner
        self.draft = draft
        # Prompt tokens fed per step: what decoding sequences wait for at most, between two tokens.
        self.prefill_budget = prefill_budget
        self.tokenizer = tokenizer
        self.conventions = conventions
        self.shared = shared  # prefixes declared shared between tenants (Model.share_prefix)
        self.waiting: deque[_Request] = deque()
        self.active: dict[int, _Active] = {}
        self._used = [0] * len(runner.slots)  # when each slot last took a request; 0: never
        self._clock = 0

    def add(self, key: Hashable, prompt: list[int], params: GenerationParams, started: float | None = None,
            tenant: str = "", sources: Iterable[Any] = ()) -> None:
        """Queue a request (FIFO); its chunks come out of `step` under `key`. It reuses only cached
        rows of `tenant`'s requests with its cache salt, and the declared shared prefixes. `sources`:
        the retrieval citations its prompt was grounded on (`Model.ground`), for its Result."""
        self.waiting.append(_Request(key, prompt, params, time.perf_counter() if started is None else started,
                                     Scope(tenant, params.cache_salt), tuple(sources)))

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def run(self) -> Iterator[tuple[Hashable, Chunk]]:
        """Step until every request has ended, yielding (key, chunk); a request's own failure
        raises (for the Python API: one caller owns every request)."""
        while self.busy:
            for key, event in self.step():
                if isinstance(event, GenerationError):
                    raise event
                yield key, event

    def step(self) -> Events:
        """Prefill up to `prefill_budget` prompt tokens (prompts already in slots first, then
        waiting ones admitted into free slots), then one batched decode step; the chunks
        made ready, last chunks included."""
        out: Events = []
        budget = self.prefill_budget
        # Cancellation is asked once before each forward a sequence takes part in.
        for slot, entry in list(self.active.items()):  # in admission order: the oldest prompt first
            if entry.pending and budget > 0:
                if entry.seq.check_cancel():
                    self._finish(slot, out)  # the slot is free for this step's admission
                else:
                    budget -= self._prefill(slot, entry, budget, out)
        # One at a time, each after the one before has its first rows: a prompt that shares the
        # prefix of the one before of its own scope (a chat turn) copies those rows instead of
        # recomputing them.
        while self.waiting and len(self.active) < len(self.runner.slots) and budget > 0:
            slot = self._admit(self.waiting.popleft(), out)
            if slot is not None:
                budget -= self._prefill(slot, self.active[slot], budget, out)
        feeds = {}
        for slot, entry in list(self.active.items()):
            if entry.pending:
                continue
            if entry.seq.check_cancel():
                self._finish(slot, out)
            else:
                feeds[slot] = entry.token
        alone = next(iter(feeds)) if len(feeds) == 1 else None
        if alone is not None and (draft := self.active[alone].seq.draft()):  # [] without a drafter
            self._verify(alone, draft, out)
        elif feeds:
            for slot, logits in self.runner.step(feeds).items():
                self._take(slot, logits, out)
        return out

    def _verify(self, slot: int, draft: list[int], out: Events) -> None:
        """Feed the sequence alone on `slot` with its draft after its token; keep what agrees."""
        entry, runner = self.active[slot], self.runner.slots[slot]
        try:
            entry.token, ready = take_rows(runner, entry.seq, runner.forward_all([entry.token, *draft]), draft)
        except GenerationError as exc:  # its grammar past a parser limit: it ends, the others go on
            out.append((self.active.pop(slot).key, exc))
            return
        out.extend((entry.key, chunk) for chunk in ready)
        if entry.seq.finish_reason is not None:
            self._finish(slot, out)

    def _admit(self, request: _Request, out: Events) -> int | None:
        """Put `request` in a free slot; the slot, or None when it ended there (cancelled while
        waiting, or its grammar refused)."""
        free = sorted((s for s in range(len(self.runner.slots)) if s not in self.active), key=self._used.__getitem__)
        cached_ids = [visible(r.tokens, r.scope, request.scope) for r in self.runner.slots]
        slot = pick_slot(cached_ids, request.prompt, free)
        self._clock += 1
        self._used[slot] = self._clock
        runner = self.runner.slots[slot]
        cached = self.runner.reuse(slot, request.prompt, request.scope, self.shared)
        try:
            seq = Sequence(request.prompt, request.params, self.tokenizer, capacity=runner.capacity,
                           cached=cached, started=request.started, conventions=self.conventions,
                           sources=request.sources,
                           drafter=drafter_for(request.params, request.scope, self.draft))
        except GenerationError as exc:  # a grammar refused: that request ends, the others go on
            out.append((request.key, exc))
            return None
        self.active[slot] = _Active(request.key, seq, list(request.prompt[cached:]))
        if seq.check_cancel():
            self._finish(slot, out)
            return None
        return slot

    def _prefill(self, slot: int, entry: _Active, budget: int, out: Events) -> int:
        """Feed `entry`'s prompt on its slot alone, piece by piece, while `budget` lasts; how many
        ids it fed. After the last piece, the first token is sampled and the sequence decodes."""
        fed = 0
        while entry.pending and fed < budget:
            n = piece(entry.pending, budget - fed)
            logits = self.runner.slots[slot].forward(entry.pending[:n])
            del entry.pending[:n]
            fed += n
        if not entry.pending:
            self._take(slot, logits, out)
        return fed

    def _take(self, slot: int, logits: np.ndarray, out: Events) -> None:
        entry = self.active[slot]
        try:
            entry.token = entry.seq.sample(logits)
            chunk = entry.seq.append(entry.token)
        except GenerationError as exc:
            out.append((self.active.pop(slot).key, exc))
            return
        if chunk is not None:
            out.append((entry.key, chunk))
        if entry.seq.finish_reason is not None:
            self._finish(slot, out)

    def _finish(self, slot: int, out: Events) -> None:
        entry = self.active.pop(slot)
        out.append((entry.key, entry.seq.finish()))


def take_rows(runner: SlotRunner, seq: Sequence, logits: Iterable[np.ndarray],
              draft: list[int]) -> tuple[int, list[Chunk]]:
    """Sample the rows of one step's `logits` (the fed token's, then one per drafted token)
    while the draft agrees; the last token sampled (to feed next) and the chunks made ready.

    Rows after the first rejected draft token hold keys of a text that was not written,
    so the cache is rewound to the accepted ones and the drafter told how many they were.
    """
    base, accepted, ready = runner.length - len(draft), 0, []
    for i, row in enumerate(logits):
        token = seq.sample(row)
        if (chunk := seq.append(token)) is not None:
            ready.append(chunk)
        if seq.finish_reason is not None or i == len(draft) or token != draft[i]:
            break
        accepted += 1
    if draft:
        runner.rewind(base + accepted)
        seq.drafter.update(len(draft), accepted)
    return token, ready

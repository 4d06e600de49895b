"""Drafts of the next tokens, verified in one forward: by prompt lookup or by a smaller model.

Prompt lookup guesses the next tokens by finding where the text last said what it says now.
An answer that quotes its input (an anomaly explanation naming sensors and readings, an
answer citing a manual) repeats runs of the prompt; so does code or a list. The last few
tokens are looked up earlier in the prompt and the answer so far, and the tokens that
followed there are the draft. The model then scores the fed token and the whole draft in
one step, and the Sequence samples each row as it would have one token at a time: every
row yields exactly one token from the same history, so greedy and seeded sampling give the
very same tokens as plain decoding (up to the graph's arithmetic on several rows), and the
draft only decides how many of them one step produces. A draft model (a smaller bundle with
the same tokenizer) guesses greedily instead, for text that repeats nothing.

`drafter_for` is the one place a request's `speculative` becomes a drafter; the scheduler
asks it for every request and verifies drafts while a sequence decodes alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import GenerationError
from .runtime.caches import Scope
from .runtime.runner import Runner, prefill

if TYPE_CHECKING:
    from .params import GenerationParams

NEEDS_DRAFT = 'speculative "draft_model" needs a draft model: edgellm.load(..., draft=BUNDLE) or --draft BUNDLE'

# Longest and shortest suffix looked up: a short one matches everywhere and drafts mostly
# wrong guesses, each of which costs a wider step. Draft length: starts at START_DRAFT, +2
# after a draft accepted whole, -1 after a rejection, at most MAX_DRAFT; at 0 the drafter rests
# for REST steps. Chosen on SmolLM2 int4's quoting workload (benchmarks/speculative.py, a quiet
# machine, medians of 9): suffixes 3-2 / drafts to 10 gave 1.39x plain, 4-3 / 10 1.57-1.59x,
# 4-3 / 6 1.58-1.73x (a 2-row step costs about 1.3 one-row steps, a 7-row one far more).
MAX_NGRAM, MIN_NGRAM = 4, 3
START_DRAFT, MAX_DRAFT, REST = 3, 6, 16


class Drafter:
    """One request's drafter: `draft` proposes, `update` learns how much was accepted and
    adapts the draft length (see START_DRAFT)."""

    def __init__(self) -> None:
        self.length = START_DRAFT
        self.resting = 0  # steps left without drafts
        self.drafted = self.accepted = 0  # totals, for measurements

    def draft(self, tokens: np.ndarray, room: int) -> list[int]:
        """Up to `room` tokens to follow `tokens`; [] when there is no guess worth a wider step."""
        if self.length == 0:
            self.resting -= 1
            if self.resting > 0:
                return []
            self.length = 1
        size = min(self.length, room)
        return self.propose(tokens, size) if size >= 1 else []

    def propose(self, tokens: np.ndarray, size: int) -> list[int]:
        raise NotImplementedError

    def update(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.length = min(self.length + 2, MAX_DRAFT) if accepted == drafted else self.length - 1
        if self.length == 0:
            self.resting = REST


class PromptLookup(Drafter):
    def propose(self, tokens: np.ndarray, size: int) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the longest suffix of
        `tokens` (MAX_NGRAM down to MIN_NGRAM tokens); [] when none recurs."""
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(tokens) <= n:
                continue
            # Windows that start early enough to have a continuation (the suffix itself has none).
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start : start + size].tolist()
        return []


class DraftModel(Drafter):
    """A smaller model's greedy guesses. Its runner keeps its own cache of the text so far,
    rewound to what the target kept before each draft (its prefix reuse does that), reusing
    only rows of the request's `scope` (kvcache.visible), as the target does."""

    def __init__(self, runner: Runner, scope: Scope = Scope()) -> None:
        super().__init__()
        self.runner = runner
        self.scope = scope

    def propose(self, tokens: np.ndarray, size: int) -> list[int]:
        ids = tokens.tolist()
        if len(ids) + size > self.runner.capacity:
            return []
        cached = self.runner.reuse(ids, self.scope)
        logits = prefill(self.runner.forward, ids[cached:])
        out: list[int] = []
        while True:
            out.append(int(np.argmax(logits)))
            if len(out) == size:
                return out
            logits = self.runner.forward(out[-1:])


def drafter_for(params: "GenerationParams", scope: Scope = Scope(), draft: Runner | None = None) -> Drafter | None:
    """The drafter `params.speculative` asks for (None: plain decoding). `draft`: the draft
    model's runner (`Model.draft`), which "draft_model" needs; it reuses only `scope`'s rows."""
    if params.speculative == "prompt_lookup":
        return PromptLookup()
    if params.speculative == "draft_model":
        if draft is None:
            raise GenerationError(NEEDS_DRAFT)
        return DraftModel(draft, scope)
    return None

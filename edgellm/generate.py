"""The generation loop: one Sequence driven against the runner, and the text around it.

`stream_chunks` owns the model side (prefix reuse, chunked prefill, one forward per
token, or per drafted run of tokens with speculation); the request side (sampling,
stops, text, usage, drafts) is the `Sequence`. A token is fed back only when the next
one is asked for, and the cache keeps only rows of tokens that were kept, so a consumer
that stops early leaves it holding ids and keys that agree.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from .errors import GenerationError
from .runtime.caches import Scope, SharedPrefixes
from .params import GenerationParams
from .sequence import Chunk, Conventions, Result, Sequence, Usage  # noqa: F401  Usage: edgellm.Usage resolves here
from .runtime.runner import Runner, prefill
from .speculate import Drafter
from .text import Tokenizer
from .tools import merge_deltas


def stream_chunks(
    runner: Runner,
    tokenizer: Tokenizer,
    prompt: list[int],
    params: GenerationParams,
    *,
    started: float,
    conventions: Conventions = Conventions(),
    drafter: Drafter | None = None,
    scope: Scope = Scope(),
    shared: SharedPrefixes | None = None,
) -> Iterator[Chunk]:
    """Generate after `prompt`, reusing the cached prefix that `scope` may see or the longest of
    the `shared` prefixes it starts with (`Runner.reuse`); the last chunk has finish_reason and usage.

    A chunk is yielded whenever text is ready; ids whose text is still held back (a
    split character, a possible stop string) ride on the next chunk.
    """
    cached = runner.reuse(prompt, scope, shared)
    seq = Sequence(prompt, params, tokenizer, capacity=runner.capacity, vocab_size=runner.vocab_size,
                   cached=cached, started=started, conventions=conventions, drafter=drafter)
    token = None
    while seq.finish_reason is None and not seq.check_cancel():
        if token is None:
            logits = [prefill(runner.forward, prompt[cached:])]
            draft: list[int] = []
        else:
            draft = seq.draft()
            logits = runner.forward_all([token, *draft]) if draft else [runner.forward([token])]
        token, ready = take_rows(runner, seq, logits, draft)
        yield from ready
    yield seq.finish()


def take_rows(runner: Runner, seq: Sequence, logits: Iterable[np.ndarray],
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


def collect(chunks: Iterator[Chunk]) -> Result:
    """Drain a stream into one Result."""
    parts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    ids: list[int] = []
    for chunk in chunks:
        parts.append(chunk.text)
        thoughts.append(chunk.reasoning)
        merge_deltas(calls, chunk.tool_calls)
        ids.extend(chunk.token_ids)
        if chunk.finish_reason is not None and chunk.usage is not None:
            return Result("".join(parts), ids, chunk.finish_reason, chunk.usage, chunk.incomplete,
                          "".join(thoughts), calls)
    raise GenerationError("generation ended without a final chunk")

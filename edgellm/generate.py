"""The generation loop: one Sequence driven against the runner, and the text around it.

`stream_chunks` owns the model side (prefix reuse, chunked prefill, one forward per
token, or per drafted run of tokens with speculation); the request side (sampling,
stops, text, usage, drafts) is the `Sequence`. A token is fed back only when the next
one is asked for, and the cache keeps only rows of tokens that were kept, so a consumer
that stops early leaves it holding ids and keys that agree.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence as Ids

import numpy as np

from .errors import GenerationError
from .params import GenerationParams
from .sequence import Chunk, Conventions, Result, Sequence, Usage  # noqa: F401  Usage: edgellm.Usage resolves here
from .session import Runner
from .text import Tokenizer
from .tools import merge_deltas

Forward = Callable[[Ids[int]], np.ndarray]

# Prefill feeds at most this many tokens per run. The attention scratch grows with
# chunk x context and the session's arena keeps its peak. SmolLM2, 2,000-token prompt,
# peak RSS / time to first token: 256: 294 MiB / 5.9 s, 128: 280 / 6.2 s, 64: 274 /
# 6.2 s, 32: 268 / 6.5 s; at 226 tokens 64 is as fast as 128 (336 vs 341 ms), 32 is 5% slower.
PREFILL_CHUNK = 64


def prefill(forward: Forward, fresh: Ids[int]) -> np.ndarray:
    """Feed `fresh` (the prompt's tail not yet cached) in chunks; the logits after its last token.

    The last chunk is never a single token when there are more (see `Runner.reuse`)."""
    # One 2,000-token pass would hold ~150 MB (see PREFILL_CHUNK).
    bounds = list(range(0, len(fresh), PREFILL_CHUNK)) + [len(fresh)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds[-2] -= 1
    for start, end in zip(bounds, bounds[1:]):
        logits = forward(fresh[start:end])
    return logits


def stream_chunks(
    runner: Runner,
    tokenizer: Tokenizer,
    prompt: list[int],
    params: GenerationParams,
    *,
    started: float,
    conventions: Conventions = Conventions(),
) -> Iterator[Chunk]:
    """Generate after `prompt`, reusing the cached prefix; the last chunk has finish_reason and usage.

    A chunk is yielded whenever text is ready; ids whose text is still held back (a
    split character, a possible stop string) ride on the next chunk.
    """
    cached = runner.reuse(prompt)
    seq = Sequence(prompt, params, tokenizer, capacity=runner.capacity, vocab_size=runner.vocab_size,
                   cached=cached, started=started, conventions=conventions)
    token = None
    while seq.finish_reason is None and not seq.check_cancel():
        if token is None:
            logits = [prefill(runner.forward, prompt[cached:])]
            draft: list[int] = []
        else:
            draft = seq.draft()
            logits = runner.forward_all([token, *draft]) if draft else [runner.forward([token])]
        base, accepted, ready = runner.length - len(draft), 0, []
        for i, row in enumerate(logits):
            token = seq.sample(row)
            if (chunk := seq.append(token)) is not None:
                ready.append(chunk)
            if seq.finish_reason is not None or i == len(draft) or token != draft[i]:
                break
            accepted += 1
        if draft:
            # Rows after the first rejected draft token hold keys of a text that was not written.
            runner.rewind(base + accepted)
            seq.lookup.update(len(draft), accepted)
        yield from ready
    yield seq.finish()


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

"""The generation loop: a step generator that yields token ids, and the text around it.

`generate_step` knows nothing of text: it samples, yields, and feeds the id back
only when the next one is asked for, so a consumer that stops early leaves the
cache holding exactly what was fed. `stream_chunks` adds the text: UTF-8-safe
deltas, stop strings held back, finish reasons and usage.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .errors import GenerationError
from .sampling import Processor, check_sampling, make_logits_processors, make_sampler
from .session import Runner
from .text import StopMatcher, StreamDecoder, Tokenizer

Forward = Callable[[Sequence[int]], np.ndarray]
Cancel = threading.Event | Callable[[], bool]


@dataclass
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV was reused, not recomputed
    completion_tokens: int  # sampled tokens, a final EOS or stop token included
    ttft_s: float  # from the request to the first sampled token
    decode_tokens_per_s: float  # tokens after the first, over the time after the first


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last chunk
    usage: Usage | None = None


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage


@dataclass(frozen=True)
class GenerationParams:
    """Every knob of one request; unset sampling knobs mean greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # benchmarks: run to max_new_tokens whatever is sampled
    cancel: Cancel | None = None
    add_generation_prompt: bool = True
    truncate: str | None = None  # "left": drop the oldest prompt tokens that do not fit

    @classmethod
    def build(cls, defaults: Mapping[str, Any], params: Mapping[str, Any], vocab_size: int) -> "GenerationParams":
        """Request params over the bundle's defaults, validated (GenerationError names the first bad one)."""
        known = {f.name for f in fields(cls)}
        for name in (*defaults, *params):
            if name not in known:
                raise GenerationError(f"unknown generation parameter {name!r}")
        merged = {**defaults, **params}
        stop = merged.get("stop", ())
        merged["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
        merged["stop_token_ids"] = tuple(merged.get("stop_token_ids") or ())
        p = cls(**merged)
        p._check(vocab_size)
        return p

    def _check(self, vocab_size: int) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        check_sampling(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            seed=self.seed, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias, vocab_size=vocab_size,
        )
        StopMatcher(self.stop)  # validates the strings
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t < vocab_size:
                raise GenerationError(f"stop_token_ids: {t!r} is not a token id below {vocab_size}")
        for name in ("ignore_eos", "add_generation_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise GenerationError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.truncate not in (None, "left"):
            raise GenerationError(f"truncate must be 'left' or None, got {self.truncate!r}")
        if self.cancel is not None and not (hasattr(self.cancel, "is_set") or callable(self.cancel)):
            raise GenerationError(f"cancel must be a threading.Event or a callable, got {self.cancel!r}")

    def cancelled(self) -> Callable[[], bool]:
        if self.cancel is None:
            return lambda: False
        return self.cancel.is_set if isinstance(self.cancel, threading.Event) else self.cancel


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Prefill feeds at most this many tokens per run. The attention scratch grows with
# chunk x context and the session's arena keeps its peak. SmolLM2, 2,000-token prompt,
# peak RSS / time to first token: 256: 294 MiB / 5.9 s, 128: 280 / 6.2 s, 64: 274 /
# 6.2 s, 32: 268 / 6.5 s; at 226 tokens 64 is as fast as 128 (336 vs 341 ms), 32 is 5% slower.
PREFILL_CHUNK = 64


def generate_step(
    forward: Forward,
    prompt: Sequence[int],
    fresh: Sequence[int],
    *,
    sampler: Callable[[np.ndarray], int],
    processors: Sequence[Processor] = (),
) -> Iterator[int]:
    """Yield sampled ids without end. `fresh` is the tail of `prompt` not yet in the cache."""
    history = np.asarray(prompt, dtype=np.int64)
    # Prefill in chunks (see PREFILL_CHUNK): one 2,000-token pass would hold ~150 MB.
    for start in range(0, len(fresh), PREFILL_CHUNK):
        logits = forward(fresh[start : start + PREFILL_CHUNK])
    while True:
        for process in processors:
            logits = process(history, logits)
        token = sampler(logits)
        yield token
        if processors:
            history = np.append(history, token)
        logits = forward([token])


def stream_chunks(
    runner: Runner,
    tokenizer: Tokenizer,
    prompt: list[int],
    params: GenerationParams,
    *,
    started: float,
) -> Iterator[Chunk]:
    """Generate after `prompt`, reusing the cached prefix; the last chunk has finish_reason and usage.

    A chunk is yielded whenever text is ready; ids whose text is still held back (a
    split character, a possible stop string) ride on the next chunk.
    """
    cancelled = params.cancelled()
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids.update(tokenizer.eos_token_ids)
    # The k-th new token needs the prompt and k-1 new ones in the cache.
    budget = min(params.max_new_tokens, runner.capacity - len(prompt) + 1)
    cached = runner.reuse(prompt)
    steps = generate_step(
        runner.forward, prompt, prompt[cached:],
        sampler=make_sampler(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                             min_p=params.min_p, seed=params.seed),
        processors=make_logits_processors(
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, logit_bias=params.logit_bias,
            vocab_size=runner.vocab_size,
        ),
    )
    decoder, matcher = StreamDecoder(tokenizer), StopMatcher(params.stop)
    pending: list[int] = []
    count, first, last = 0, 0.0, 0.0
    while True:
        text = ""
        if cancelled():
            finish = "cancelled"
            break
        token = next(steps)
        last = time.perf_counter()
        first = first or last
        count += 1
        if token in stop_ids:
            finish = "stop"
            break
        pending.append(token)
        text, stopped = matcher.push(decoder.push(token))
        if stopped:
            finish = "stop"
            break
        if count >= budget:
            finish = "length"
            break
        if text:
            yield Chunk(text, pending)
            pending = []
    steps.close()
    if not matcher.stopped:
        more, stopped = matcher.push(decoder.flush())
        text += more if stopped else more + matcher.flush()
        finish = "stop" if stopped else finish
    usage = Usage(
        prompt_tokens=len(prompt),
        cached_prompt_tokens=cached,
        completion_tokens=count,
        ttft_s=(first - started) if count else 0.0,
        decode_tokens_per_s=(count - 1) / (last - first) if count > 1 and last > first else 0.0,
    )
    yield Chunk(text, pending, finish, usage)


def collect(chunks: Iterator[Chunk]) -> Result:
    """Drain a stream into one Result."""
    parts: list[str] = []
    ids: list[int] = []
    for chunk in chunks:
        parts.append(chunk.text)
        ids.extend(chunk.token_ids)
        if chunk.finish_reason is not None and chunk.usage is not None:
            return Result("".join(parts), ids, chunk.finish_reason, chunk.usage)
    raise GenerationError("generation ended without a final chunk")

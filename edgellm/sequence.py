"""One request's decoding state: a row of logits in, a token out, text out.

A `Sequence` is built once from validated parameters and holds everything that
belongs to one request: sampler, logits processors, stop rules, the streaming
detokenizer, the token budget, cancel and usage counters. It does not hold the
model or its KV cache: whoever owns those (today `generate.stream_chunks`, one
sequence at a time; later a scheduler stepping many with one batched forward)
hands each sequence its logits and feeds back the token it picked.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .grammar import GrammarState, compile_grammar
from .params import GenerationParams
from .sampling import Processor, make_logits_processors, make_sampler
from .text import StopMatcher, StreamDecoder, Tokenizer


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
    incomplete: bool = False  # last chunk: the output stopped short of its response_format/grammar


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    incomplete: bool = False  # the text stopped short of its response_format/grammar: it will not validate


class Sequence:
    """The decoding state of one request; see the module docstring for who drives it.

    `processors` apply in order before the sampler; a grammar state joins the list
    (first, so that nothing after it sees a token it forbids as likely) and puts its
    `advance` in `on_token`, which hears every sampled token, stop tokens included.
    """

    def __init__(
        self,
        prompt: list[int],
        params: GenerationParams,
        tokenizer: Tokenizer,
        *,
        capacity: int,
        vocab_size: int,
        cached: int = 0,
        started: float | None = None,
    ) -> None:
        self.prompt = prompt
        self.params = params
        self.cached = cached
        self.started = time.perf_counter() if started is None else started
        # The k-th new token needs the prompt and k-1 new ones in the cache.
        self.budget = min(params.max_new_tokens, capacity - len(prompt) + 1)
        self.sampler = make_sampler(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                    min_p=params.min_p, seed=params.seed)
        self.processors: list[Processor] = make_logits_processors(
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, logit_bias=params.logit_bias,
            penalty_window=params.penalty_window, vocab_size=vocab_size,
        )
        self.on_token: list[Callable[[int], None]] = []
        self.stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(tokenizer.eos_token_ids))
        self.grammar: GrammarState | None = None
        spec = params.response_format or params.grammar
        if spec is not None:
            # EOS for the grammar is whatever ends this sequence, so it is allowed only where the output is complete.
            eos = sorted(self.stop_ids) or tokenizer.eos_token_ids
            self.grammar = compile_grammar(spec, tokenizer, eos).start()
            self.processors.insert(0, self.grammar)
            self.on_token.append(self.grammar.advance)
        self.decoder = StreamDecoder(tokenizer)
        self.matcher = StopMatcher(params.stop)
        self.cancelled = params.cancelled()
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        # Prompt and sampled ids in one buffer sized for the whole budget, so the
        # processors get a view per token instead of a copy.
        self._ids = np.empty(len(prompt) + max(self.budget, 1), dtype=np.int64)
        self._ids[: len(prompt)] = prompt
        self._length = len(prompt)
        self._pending: list[int] = []  # ids whose text is still held back
        self._tail = ""  # text made ready by the token that ended the sequence
        self._first = self._last = 0.0

    @property
    def tokens(self) -> np.ndarray:
        """The prompt and every sampled token so far, as processors see them."""
        return self._ids[: self._length]

    def sample(self, logits: np.ndarray) -> int:
        """The next token from this sequence's row of logits."""
        for process in self.processors:
            logits = process(self.tokens, logits)
        return self.sampler(logits)

    def append(self, token: int) -> Chunk | None:
        """Take the token just sampled: a Chunk when it makes text ready and the sequence
        goes on. When it ends the sequence, `finish_reason` is set and `finish` gives the
        last chunk."""
        self._last = time.perf_counter()
        self._first = self._first or self._last
        self.completion_tokens += 1
        for hook in self.on_token:
            hook(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return None
        self._ids[self._length] = token
        self._length += 1
        self._pending.append(token)
        text, stopped = self.matcher.push(self.decoder.push(token))
        if stopped or (self.grammar is not None and self.grammar.done):
            self.finish_reason = "stop"
        elif self.completion_tokens >= self.budget:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self._tail = text
            return None
        return self._chunk(text) if text else None

    def check_cancel(self) -> bool:
        """Whether the request was cancelled (then it is finished): ask before each forward."""
        if self.finish_reason is None and self.cancelled():
            self.finish_reason = "cancelled"
        return self.finish_reason == "cancelled"

    def finish(self) -> Chunk:
        """The last chunk: text still held back, finish_reason and usage."""
        text = self._tail
        if not self.matcher.stopped:
            more, stopped = self.matcher.push(self.decoder.flush())
            text += more if stopped else more + self.matcher.flush()
            self.finish_reason = "stop" if stopped else self.finish_reason
        chunk = self._chunk(text, self.finish_reason, self.usage())
        chunk.incomplete = self.incomplete
        return chunk

    @property
    def incomplete(self) -> bool:
        """The output is not yet a whole answer under the grammar (budget or cancel came first)."""
        return self.grammar is not None and not self.grammar.accepting

    def usage(self) -> Usage:
        count, first, last = self.completion_tokens, self._first, self._last
        return Usage(
            prompt_tokens=len(self.prompt),
            cached_prompt_tokens=self.cached,
            completion_tokens=count,
            ttft_s=(first - self.started) if count else 0.0,
            decode_tokens_per_s=(count - 1) / (last - first) if count > 1 and last > first else 0.0,
        )

    def _chunk(self, text: str, finish_reason: str | None = None, usage: Usage | None = None) -> Chunk:
        chunk = Chunk(text, self._pending, finish_reason, usage)
        self._pending = []
        return chunk

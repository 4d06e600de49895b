"""One request's decoding state: a row of logits in, a token out, text out.

A `Sequence` is built once from validated parameters and holds everything that
belongs to one request: sampler, logits processors, grammar, stop rules, the
streaming detokenizer, the think-block tracker, the tool-call parser, the token
budget, cancel and usage counters, and what it handed out so far, from which its
last chunk carries the whole `Result` (every front serializes that one instead of
rebuilding it). It does not hold the model or its KV cache: the scheduler
(`edgellm.scheduler`, one slot or many) hands each sequence its logits and feeds back
the token it picked.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .grammar import Grammar, GrammarSpec, GrammarState, compile_grammar
from .params import GenerationParams
from .reasoning import Markers, Reasoning
from .sampling import Processor, make_logits_processors, make_sampler
from .speculate import Drafter
from .text import StopMatcher, StreamDecoder, Tokenizer
from .tools import Syntax, ToolCallParser, call_schema, merge_deltas


@dataclass(frozen=True)
class Conventions:
    """What a model's chat format says about its replies, read once at load: its think
    markers (None: it does not reason), the syntax it writes tool calls in, whether its
    vocabulary has the Hermes call tags as tokens, and whether its template renders tools
    (a model that was taught to call them)."""

    markers: Markers | None = None
    syntax: Syntax = "hermes"
    call_tags: bool = False
    native_tools: bool = False


@dataclass
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV was reused, not recomputed
    completion_tokens: int  # sampled tokens, a final EOS or stop token included
    ttft_s: float  # from the request to the first sampled token
    decode_tokens_per_s: float  # tokens after the first, over the time after the first
    reasoning_tokens: int = 0  # completion tokens inside the think block, markers not counted
    draft_tokens: int = 0  # tokens drafted (speculative), verified in the steps that emitted them
    accepted_draft_tokens: int = 0  # drafted tokens the model agreed with


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    incomplete: bool = False  # the text stopped short of its response_format/grammar: it will not validate
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's `tool_calls`, arguments as JSON text
    # The request's retrieval sources (retrieval.grounding.Citation.to_dict), each marked cited or not.
    citations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "cancelled" on the last chunk
    usage: Usage | None = None
    incomplete: bool = False  # last chunk: the output stopped short of its response_format/grammar/call
    reasoning: str = ""  # think-block text, apart from `text` (reasoning "separate")
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool-call deltas
    result: Result | None = None  # on the last chunk: the whole request, what every front answers with


class Accumulator:
    """What a sequence handed out in its chunks, kept so that its end is told once: the last
    chunk's `Result`, which the Python API returns and every front serializes."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict[str, Any]] = []  # the deltas merged into whole calls

    def add(self, chunk: Chunk) -> None:
        self.text.append(chunk.text)
        self.reasoning.append(chunk.reasoning)
        merge_deltas(self.calls, chunk.tool_calls)

    def result(self, last: Chunk, token_ids: list[int]) -> Result:
        """The whole request once `last` (with finish_reason and usage) was added."""
        return Result("".join(self.text), token_ids, last.finish_reason or "stop", last.usage, last.incomplete,
                      "".join(self.reasoning), self.calls)


def stop_ids(params: GenerationParams, tokenizer: Tokenizer) -> frozenset[int]:
    """The token ids that end a request's output."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(tokenizer.eos_token_ids))


def request_grammar(params: GenerationParams, tokenizer: Tokenizer, conventions: Conventions) -> Grammar | None:
    """The grammar a request's output is held to (None: free text), compiled for `tokenizer`:
    its response_format or grammar, or the call grammar its tools ask for. The engine calls
    it on its grammar thread before the request enters the queue, and holds what it gives
    until the request ends, so the Sequence built on the worker finds it compiled."""
    choice = params.tool_choice
    spec = params.response_format or params.grammar
    answer = spec.source if spec is not None and spec.kind == "json_schema" else None
    # A model never taught tools repeats a call it was shown rather than ending its turn.
    parallel = conventions.native_tools if params.parallel_tool_calls is None else params.parallel_tool_calls
    calls = call_schema(params.tools, choice, conventions.syntax, answer, conventions.call_tags, parallel)
    if calls is not None:
        allowed = {t.name for t in choice.allowed(params.tools)}
        parts = [(f"tools[{i}].function.parameters", t.parameters) for i, t in enumerate(params.tools)
                 if t.name in allowed]
        if answer is not None:
            parts.append((spec.where, answer))
        spec = GrammarSpec("lark", calls["value"], "tools", tuple(parts))
    if spec is None:
        return None
    # EOS for the grammar is whatever ends the output, so it is allowed only where the output is complete.
    return compile_grammar(spec, tokenizer, sorted(stop_ids(params, tokenizer)) or tokenizer.eos_token_ids)


class Sequence:
    """The decoding state of one request; see the module docstring for who drives it.

    Before each sample the grammar masks the logits (only the answer's: a think block
    is free), then `processors` apply in order, then the sampler. Each token kept goes
    to the think-block tracker or, as answer text, through the grammar, the stop
    matcher and the tool-call parser.
    """

    def __init__(
        self,
        prompt: list[int],
        params: GenerationParams,
        tokenizer: Tokenizer,
        *,
        capacity: int,
        cached: int = 0,
        started: float | None = None,
        conventions: Conventions = Conventions(),
        drafter: Drafter | None = None,
        sources: tuple[Any, ...] = (),
    ) -> None:
        self.prompt = prompt
        self.sources = sources  # retrieval.grounding.Citation of the sources the prompt holds
        self.params = params
        self.cached = cached
        self.started = time.perf_counter() if started is None else started
        # The k-th new token needs the prompt and k-1 new ones in the cache.
        self.budget = min(params.max_new_tokens, capacity - len(prompt) + 1)
        self.sampler = make_sampler(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                    min_p=params.min_p, seed=params.seed)
        self.greedy = params.temperature == 0
        self.processors: list[Processor] = make_logits_processors(
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, logit_bias=params.logit_bias,
            penalty_window=params.penalty_window,
        )
        self.stop_ids = stop_ids(params, tokenizer)
        callable_tools = params.tool_choice.allowed(params.tools)
        self.tools = ToolCallParser(callable_tools) if callable_tools else None
        grammar = request_grammar(params, tokenizer, conventions)
        self.grammar: GrammarState | None = grammar.start() if grammar is not None else None
        self.reasoning: Reasoning | None = None
        if (markers := conventions.markers) is not None:
            inside = markers.opened_by(tokenizer.decode(prompt[-8:], skip_special_tokens=False))
            self.reasoning = Reasoning(markers, params.reasoning or "separate", tokenizer, inside=inside,
                                       max_tokens=params.max_reasoning_tokens)
        self.drafter = drafter
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
        self._text = self._thought = ""  # output made ready and not yet handed out in a chunk
        self._calls: list[dict[str, Any]] = []
        self.whole = Accumulator()
        self._first = self._last = 0.0

    @property
    def tokens(self) -> np.ndarray:
        """The prompt and every sampled token so far, as processors see them."""
        return self._ids[: self._length]

    def draft(self) -> list[int]:
        """Tokens to verify after the last one sampled ([] without speculation): as many as
        the budget and the cache leave room for, with the token after them."""
        if self.drafter is None:
            return []
        return self.drafter.draft(self.tokens, self.budget - self.completion_tokens - 1)

    def sample(self, logits: np.ndarray) -> int:
        """The next token from this sequence's row of logits."""
        r = self.reasoning
        if r is not None and (forced := r.forced()) is not None:
            return forced
        if self.greedy and self.grammar is not None and (r is None or r.answering):
            # The processors act token by token, so the best token they leave is the masked
            # answer whenever the grammar takes it: asking costs 2 us, a mask of SmolLM2's
            # 49k tokens 0.1-0.5 ms a step.
            token = self._pick(logits)
            if self.grammar.allows(token):
                return token
        if r is not None:
            logits = r.constrain(self.tokens, logits, self.grammar)
        elif self.grammar is not None:
            logits = self.grammar(self.tokens, logits)
        return self._pick(logits)

    def _pick(self, logits: np.ndarray) -> int:
        for process in self.processors:
            logits = process(self.tokens, logits)
        return self.sampler(logits)

    def append(self, token: int) -> Chunk | None:
        """Take the token just sampled: a Chunk when it makes output ready and the sequence
        goes on. When it ends the sequence, `finish_reason` is set and `finish` gives the
        last chunk."""
        self._last = time.perf_counter()
        self._first = self._first or self._last
        self.completion_tokens += 1
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return None
        self._ids[self._length] = token
        self._length += 1
        self._pending.append(token)
        thought = self.reasoning.push(token) if self.reasoning is not None else None
        stopped = False
        if thought is not None:
            self._thought += thought
        else:
            if self.grammar is not None:
                self.grammar.advance(token)
            text, stopped = self.matcher.push(self.decoder.push(token))
            self._answer(text)
        if stopped or (self.grammar is not None and self.grammar.done):
            self.finish_reason = "stop"
        elif self.completion_tokens >= self.budget:
            self.finish_reason = "length"
        if self.finish_reason is None and (self._text or self._thought or self._calls):
            return self._chunk()
        return None

    def check_cancel(self) -> bool:
        """Whether the request was cancelled (then it is finished): ask before each forward."""
        if self.finish_reason is None and self.cancelled():
            self.finish_reason = "cancelled"
        return self.finish_reason == "cancelled"

    def finish(self) -> Chunk:
        """The last chunk: output still held back, finish_reason, usage and the whole `Result`."""
        if not self.matcher.stopped:
            more, stopped = self.matcher.push(self.decoder.flush())
            self._answer(more if stopped else more + self.matcher.flush())
            self.finish_reason = "stop" if stopped else self.finish_reason
        if self.reasoning is not None:
            self._thought += self.reasoning.flush()
        if self.tools is not None:
            events, calls = self.tools.finish()
            self._route(events)
            if calls and self.finish_reason == "stop":
                self.finish_reason = "tool_calls"
        chunk = self._chunk(self.finish_reason, self.usage(), self.incomplete)
        chunk.result = self.whole.result(chunk, self.tokens[len(self.prompt):].tolist())
        if self.sources:
            from .retrieval.retriever import citations

            chunk.result.citations = citations(chunk.result.text, self.sources)
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
            reasoning_tokens=self.reasoning.spent if self.reasoning is not None else 0,
            draft_tokens=self.drafter.drafted if self.drafter is not None else 0,
            accepted_draft_tokens=self.drafter.accepted if self.drafter is not None else 0,
        )

    def _answer(self, text: str) -> None:
        if self.reasoning is not None:
            text = self.reasoning.answer_text(text)
        if self.tools is not None:
            self._route(self.tools.feed(text))
        else:
            self._text += text

    def _route(self, events: list[str | dict[str, Any]]) -> None:
        for event in events:
            if isinstance(event, str):
                self._text += event
            else:
                self._calls.append(event)

    def _chunk(self, finish_reason: str | None = None, usage: Usage | None = None,
               incomplete: bool = False) -> Chunk:
        chunk = Chunk(self._text, self._pending, finish_reason, usage, incomplete, self._thought, self._calls)
        self._text, self._thought, self._pending, self._calls = "", "", [], []
        self.whole.add(chunk)
        return chunk

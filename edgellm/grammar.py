"""Constrained decoding: JSON schemas, regexes and Lark grammars as one logits processor.

llguidance (the Rust engine onnxruntime-genai uses) compiles a grammar against the
byte strings of a vocabulary and gives, per step, a bitmask of the tokens that keep
the output inside the grammar; it reads byte-level BPE (GPT-2 byte mapping) and
SentencePiece byte-fallback (`<0x0A>`, `▁`) vocabularies from tokenizer.json alone,
without transformers. It is an optional extra imported only when a request asks for
a grammar, so the runtime installs without it; its abi3 wheels cover x86_64 and
aarch64 (manylinux_2_31: Raspberry Pi OS bullseye and later).

Flow: `parse_response_format` checks a request's field and validates its grammar
without a tokenizer, so a bad one is refused before it queues (GrammarError naming
the JSON path at fault); `compile_grammar` binds it to a Tokenizer (both cached);
`Grammar.start()` gives one request its `GrammarState`, the processor the Sequence
runs before its sampler and advances with every token it keeps.

Cost on SmolLM2's 49,152-token vocabulary (x86-64 EPYC shared with other jobs, random
logits under tests/test_grammar.py's nested schema; medians, best of 5 repeats in
brackets): the mask 0.09 ms (0.02), its -inf penalties 0.04-0.10 ms (0.03), adding
them to the row 0.03 ms (0.014). Once per tokenizer 0.8 s (llguidance's view of the
vocabulary), once per schema 1-3 ms, per request 7 us (a copy of the compiled matcher);
validating a request's schema 0.5-5 ms.
"""
from __future__ import annotations

import copy
import json
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import GrammarError
from .text import Tokenizer

INSTALL_HINT = 'constrained decoding needs llguidance: pip install "edgellm[grammar]"'

# One-line JSON: with flexible whitespace a small model (or temperature 1.0) can wander
# through spaces and newlines for hundreds of tokens without closing the object. A
# schema's own "x-guidance" options still override this.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Compiled grammars kept per tokenizer: a service sees a few recurring schemas, while a
# client sending a fresh one per request must not grow memory without end.
_MAX_COMPILED = 32

# Validations spent finding where a schema's error is (each 0.2-10 ms; a bisection
# needs about log2(subschemas) per level): a huge schema must not hold the service.
_BLAME_CHECKS = 100

# Where subschemas live, to find which one llguidance's error is about. $defs come
# first: a broken definition also breaks every $ref to it.
_SCHEMA_MAPS = ("$defs", "definitions", "properties", "patternProperties", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_ONE = ("additionalProperties", "items", "additionalItems", "contains", "not", "if",
               "then", "else", "propertyNames", "unevaluatedProperties", "unevaluatedItems")

# For each mask byte, 0 for its set bits and -inf for its clear ones: one gather turns a
# bitmask into additive penalties at a speed that does not depend on the mask's pattern
# (a boolean-indexed store costs 0.03-0.36 ms on 49k tokens, depending on the pattern).
_PENALTY = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1,
    np.float32(0), np.float32(-np.inf)).astype(np.float32)


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:
        raise GrammarError(INSTALL_HINT) from e
    return llguidance


@dataclass(frozen=True)
class GrammarSpec:
    """A validated constraint. `kind` is "json_schema", "regex" or "lark"; `source` the
    schema as JSON text or the grammar as written; `grammar` llguidance's form of it;
    `where` the request field it came from, for later error messages."""

    kind: str
    source: str
    grammar: str = field(repr=False)
    where: str = field(default="response_format", compare=False)


def parse_response_format(value: Any, where: str = "response_format") -> GrammarSpec | None:
    """The constraint a request field asks for; None for plain text.

    OpenAI's shapes `{"type": "text"}`, `{"type": "json_object"}` and `{"type":
    "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`, and
    edgellm's `{"type": "regex" | "lark", "value": "..."}` (the `grammar` field: pass
    where="grammar"). Raises GrammarError naming the path at fault, down to the keyword
    inside a schema (`response_format.json_schema.schema.properties.x.type`).
    """
    if value is None:
        return None
    obj = _object(value, where)
    kind = obj.get("type")
    if kind == "text":
        _only(obj, where, ("type",))
        return None
    if kind == "json_object":
        _only(obj, where, ("type",))
        return check_schema({"type": "object"}, where)
    if kind == "json_schema":
        _only(obj, where, ("type", "json_schema"))
        inner_where = f"{where}.json_schema"
        inner = _object(obj.get("json_schema"), inner_where)
        _only(inner, inner_where, ("name", "schema", "strict", "description"))
        for key, kind_, what in (("name", str, "a string"), ("description", str, "a string"),
                                 ("strict", bool, "true or false")):
            if key in inner and not isinstance(inner[key], kind_):
                raise GrammarError(f"{inner_where}.{key} must be {what}, got {inner[key]!r}")
        if "schema" not in inner:
            raise GrammarError(f"{inner_where}.schema is required")
        return check_schema(_object(inner["schema"], f"{inner_where}.schema"), f"{inner_where}.schema")
    if kind in ("regex", "lark"):
        _only(obj, where, ("type", "value"))
        text = obj.get("value")
        if not isinstance(text, str) or not text:
            raise GrammarError(f"{where}.value must be a non-empty string, got {text!r}")
        matcher = _llguidance().LLMatcher
        grammar = matcher.grammar_from_regex(text) if kind == "regex" else matcher.grammar_from_lark(text)
        error = _invalid(grammar)
        if error:
            raise GrammarError(f"{where}.value: {_one_line(error)}")
        return GrammarSpec(kind, text, grammar, where)
    raise GrammarError(f"{where}.type must be one of 'text', 'json_object', 'json_schema', "
                       f"'regex', 'lark', got {kind!r}")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise GrammarError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _only(obj: dict[str, Any], where: str, known: tuple[str, ...]) -> None:
    for key in obj:
        if key not in known:
            raise GrammarError(f"{where}.{key} is not a known field (expected {', '.join(known)})")


def check_schema(schema: dict[str, Any], where: str) -> GrammarSpec:
    """A JSON schema compiled to a constraint; GrammarError naming the keyword at fault."""
    try:
        source = json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise GrammarError(f"{where} is not JSON: {e}") from None
    grammar = _schema_grammar(source)
    error = _invalid(grammar)
    if error:
        path, detail = _blame(schema, error)
        raise GrammarError(f"{where}{path}: {_one_line(detail)}")
    return GrammarSpec("json_schema", source, grammar, where)


def _schema_grammar(schema: dict[str, Any] | str) -> str:
    return _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_LAYOUT)


def _invalid(grammar: str) -> str:
    """llguidance's error for `grammar`, or "" when it is valid."""
    failed, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if failed else ""


def _blame(schema: dict[str, Any], error: str) -> tuple[str, str]:
    """Where in `schema` llguidance's `error` is, and the most specific message for it:
    its messages name the fault but not the place. Subschemas are replaced by {} (any
    value), half of a node's at a time, down to the smallest whose removal clears the
    error; then each of its keywords is dropped. The path is "" for the schema as a
    whole. The subschema checked alone may say more ("minItems (5) is greater than
    maxItems (2)" where the whole says "required property 'x' is unsatisfiable")."""
    holder: dict[str, Any] = {"": copy.deepcopy(schema)}
    checks = iter(range(_BLAME_CHECKS))

    def gone() -> bool:
        # Out of checks, the search stops narrowing down and blames where it got to.
        return next(checks, None) is not None and _invalid(_schema_grammar(holder[""])) != error

    def cleared(parts: Sequence[tuple[str, Any, Any]]) -> bool:
        saved = [container[at] for _, container, at in parts]
        for _, container, at in parts:
            container[at] = {}
        result = gone()
        for (_, container, at), value in zip(parts, saved):
            container[at] = value
        return result

    path, parent, key = "", holder, ""
    while isinstance(node := parent[key], dict):
        parts = list(_subschemas(node))
        lo, hi = 0, len(parts)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cleared(parts[lo:mid]) else (mid, hi)
        if parts and cleared(parts[lo:hi]):
            step, parent, key = parts[lo]
            path += step
            continue
        fixes = []
        for keyword in list(node):
            parent[key] = {k: v for k, v in node.items() if k != keyword}
            if gone():
                fixes.append(keyword)
        parent[key] = node
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        alone = _invalid(_schema_grammar({**defs, **node})) if path else ""
        return path + (_step(fixes[0]) if len(fixes) == 1 else ""), alone or error
    return path, error


def _subschemas(node: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    """(path step, container, key) of each direct subschema of `node`."""
    for name in _SCHEMA_MAPS:
        if isinstance(group := node.get(name), dict):
            for key in group:
                yield _step(name) + _step(key), group, key
    for name in _SCHEMA_LISTS:
        if isinstance(group := node.get(name), list):
            for i in range(len(group)):
                yield f"{_step(name)}[{i}]", group, i
    for name in _SCHEMA_ONE:
        if isinstance(node.get(name), dict):
            yield _step(name), node, name


def _step(key: str) -> str:
    return f".{key}" if re.fullmatch(r"[\w$-]+", key) else f"[{json.dumps(key, ensure_ascii=False)}]"


def _one_line(message: str) -> str:
    """llguidance's message without its source excerpts, carets and state dump, on one line."""
    message = message.split("\n<state>", 1)[0]
    lines = (line.strip() for line in message.splitlines())
    return " ".join(line for line in lines if line and not re.fullmatch(r"\^+|\d+ \|.*", line))[:300]


class _Bridge:
    """llguidance's view of one Tokenizer with one set of EOS ids, and its compiled grammars
    (a compiled matcher is never advanced: each request gets a copy)."""

    def __init__(self, tokenizer: Tokenizer, eos: tuple[int, ...]) -> None:
        # Kept: the tokenizers library counts its vocabulary anew on every call (37 ms at 49k).
        self.vocab_size = tokenizer.vocab_size
        self.ll = _llguidance().LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=self.vocab_size,
                                            eos_token=list(eos))
        self.compiled: OrderedDict[str, Any] = OrderedDict()


_BRIDGES: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, ...], _Bridge]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def compile_grammar(spec: GrammarSpec, tokenizer: Tokenizer,
                    eos_token_ids: Sequence[int] | None = None) -> Grammar:
    """`spec` bound to `tokenizer`. The grammar allows an EOS id (the tokenizer's unless
    `eos_token_ids` is given, e.g. a chat template's end-of-turn) only where it accepts.
    llguidance's view of a tokenizer (0.3-0.8 s for 49k tokens) and the last grammars
    compiled for it are cached for as long as the Tokenizer lives."""
    eos = tuple(int(t) for t in (tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids))
    if not eos:
        raise GrammarError(f"{spec.where}: a grammar needs at least one EOS token id")
    with _LOCK:
        bridges = _BRIDGES.setdefault(tokenizer, {})
        bridge = bridges.get(eos)
        if bridge is None:
            bridge = bridges[eos] = _Bridge(tokenizer, eos)
        matcher = bridge.compiled.pop(spec.grammar, None)
        if matcher is None:
            matcher = _llguidance().LLMatcher(bridge.ll, spec.grammar, log_level=0)
            if matcher.is_error():
                raise GrammarError(f"{spec.where}: {_one_line(matcher.get_error())}")
        bridge.compiled[spec.grammar] = matcher
        while len(bridge.compiled) > _MAX_COMPILED:
            bridge.compiled.popitem(last=False)
    return Grammar(matcher, bridge.vocab_size, spec.where)


class Grammar:
    """A grammar compiled for one tokenizer; `start()` gives each request its own state."""

    def __init__(self, matcher: Any, vocab_size: int, where: str) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.where = where

    def start(self) -> GrammarState:
        return GrammarState(self._matcher.deep_copy(), self.vocab_size, self.where)


class GrammarState:
    """One request's position in its grammar, and the processor that keeps it there.

    Call it as a processor `(tokens, logits) -> logits`: ids the grammar forbids at this
    point become -inf, as do the rows past the tokenizer's vocabulary (a model's logits
    may be wider). It writes into a writable float32 row and returns it; other rows are
    copied. `tokens` is unused: the state follows `advance`, called once per kept token.
    """

    def __init__(self, matcher: Any, vocab_size: int, where: str) -> None:
        self._matcher = matcher
        self._vocab = vocab_size
        self._where = where
        self._mask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._penalty = np.empty((self._mask.nbytes, 8), dtype=np.float32)
        self._stale = True

    def __call__(self, tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if self._stale:
            # The same computation as llguidance.numpy.fill_next_token_bitmask, into a
            # buffer this state owns; the penalties are kept until the next advance.
            self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
            self._check()
            np.take(_PENALTY, self._mask.view(np.uint8), axis=0, out=self._penalty)
            self._stale = False
        if logits.dtype != np.float32 or not logits.flags.writeable:
            logits = logits.astype(np.float32)
        n = min(logits.shape[-1], self._vocab)
        logits[:n] += self._penalty.reshape(-1)[:n]
        logits[n:] = -np.inf
        return logits

    def allows(self, token_id: int) -> bool:
        """Whether the grammar takes `token_id` next: one check instead of a whole mask."""
        return 0 <= token_id < self._vocab and self._matcher.validate_tokens([int(token_id)]) == 1

    def advance(self, token_id: int) -> None:
        """Move past a kept token; GrammarError if the grammar forbids it (a sampler that
        ignored the mask) or the grammar fails (a parser limit reached)."""
        self._matcher.consume_token(int(token_id))
        self._check()
        self._stale = True

    def rollback(self, n: int) -> None:
        """Undo the last `n` advances, e.g. speculated tokens the model rejected."""
        if n and not self._matcher.rollback(n):
            raise GrammarError(f"{self._where}: cannot roll the grammar back {n} tokens: "
                               f"{_one_line(self._matcher.get_error())}")
        self._stale = True

    @property
    def accepting(self) -> bool:
        """The output so far is complete under the grammar: EOS is allowed now."""
        return self._matcher.is_accepting()

    @property
    def done(self) -> bool:
        """The grammar allows nothing more but EOS: generation must stop here."""
        return self._matcher.is_stopped()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"{self._where}: {_one_line(self._matcher.get_error())}")

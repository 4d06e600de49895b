"""Constrained decoding: JSON schemas, regexes and Lark grammars as one logits processor.

llguidance (the Rust engine onnxruntime-genai uses) compiles a grammar against the
byte strings of a vocabulary and gives, per step, a bitmask of the tokens that keep
the output inside the grammar; it reads byte-level BPE (GPT-2 byte mapping) and
SentencePiece byte-fallback (`<0x0A>`, `▁`) vocabularies from tokenizer.json alone,
without transformers. It is an optional extra imported only when a request asks for
a grammar, so the runtime installs without it; its abi3 wheels cover x86_64 and
aarch64 (manylinux_2_31: Raspberry Pi OS bullseye and later).

Flow: `parse_response_format` checks a request field's shape and what is cheap to see on
the thread that receives it (nesting depth, JSON, text), so a malformed one is refused before
it queues; `compile_grammar` validates it (GrammarError naming the JSON path at fault), binds
it to a Tokenizer and runs its first step, within `_LIMITS` and `COMPILE_SECONDS`. A service
compiles off its receiving and decoding threads (`edgellm.engine`), so a costly or exploding
grammar stalls no one else. Only what compiled and ran is cached, and a grammar that fails
later is dropped from the cache, so a failed one never stays in memory.
`Grammar.start()` gives one request its `GrammarState`, the processor the Sequence runs
before its sampler and advances with every token it keeps.

Cost on SmolLM2's 49,152-token vocabulary (x86-64 EPYC shared with other jobs, random
logits under tests/test_grammar.py's nested schema; medians, best of 5 repeats in
brackets): the mask 0.09 ms (0.02), its -inf penalties 0.04-0.10 ms (0.03), adding
them to the row 0.03 ms (0.014). Once per tokenizer 0.8 s (llguidance's view of the
vocabulary), once per schema 1-3 ms, per request 7 us (a copy of the compiled matcher);
validating a request's schema 0.5-5 ms.
"""
from __future__ import annotations

import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import GrammarError
from .netjson import encodable
from .text import Tokenizer

INSTALL_HINT = 'constrained decoding needs llguidance: pip install "edgellm[grammar]"'

# One-line JSON: with flexible whitespace a small model (or temperature 1.0) can wander
# through spaces and newlines for hundreds of tokens without closing the object. A
# schema's own "x-guidance" options still override this.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Compiled grammars kept per tokenizer: a service sees a few recurring schemas, while a
# client sending a fresh one per request must not grow memory without end.
_MAX_COMPILED = 32

# Validations, and seconds, spent finding where a schema's error is (each 0.2-10 ms, 0.2 s
# for 16,000 properties; a bisection needs about log2(subschemas) per level): past either,
# the error names the place the search got to.
_BLAME_CHECKS = 100
_BLAME_SECONDS = 1.0

# What compiling one grammar may cost: llguidance's parser limits (its defaults suit a
# server), and a time limit checked between the steps they bound. Under the defaults the
# regex (x{1000}){1000} took 1.3-2 s and 160-190 MiB to its first step on SmolLM2's
# vocabulary; under these, 0.3 s and 30 MiB. The tests' schemas, regexes and tool grammars
# decode as before within 50,000 fuel and 10,000 lexer states; 40 tools with enums of 100
# entities (87 KB of grammar, more than a small model's context) within 100,000 fuel.
_LIMITS = {"initial_lexer_fuel": 200_000, "max_lexer_states": 20_000}
COMPILE_SECONDS = 5.0

# JSON nesting of a schema: llguidance reads at most 128 levels, and a tool's schema sits a
# few levels down in the call grammar. Real schemas stay under 20.
MAX_DEPTH = 64

# Characters of a schema's JSON text or a grammar: validating takes no more than 0.25 s at
# this size (x86-64, the worst of many shapes tried) but grows faster than the size (3.5 s
# for a valid schema of 16,000 properties, 617 KB), and no step of it can be interrupted.
# A small model's schemas and tools are a few KB (they share its context with the prompt).
MAX_SOURCE = 64 * 1024

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
    """A constraint whose shape is checked; `compile_grammar` validates what it says.
    `kind` is "json_schema", "regex" or "lark"; `source` the schema as JSON text or the
    grammar as written; `where` the request field it came from, for error messages;
    `parts` the (field, schema or its JSON text) pairs inside a grammar built from several
    (a tool call's), to name the one at fault when it does not compile."""

    kind: str
    source: str
    where: str = field(default="response_format", compare=False)
    parts: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)


def parse_response_format(value: Any, where: str = "response_format") -> GrammarSpec | None:
    """The constraint a request field asks for; None for plain text.

    OpenAI's shapes `{"type": "text"}`, `{"type": "json_object"}` and `{"type":
    "json_schema", "json_schema": {"name", "schema", "strict", "description"}}` (strict closes
    its objects, `closed_objects`), and
    edgellm's `{"type": "regex" | "lark", "value": "..."}` (the `grammar` field: pass
    where="grammar"). Only the shape is checked here, and what `schema_spec` checks: cheap
    enough for the thread that receives the request. Raises GrammarError naming the field.
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
        return schema_spec({"type": "object"}, where)
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
        spec = schema_spec(inner["schema"], f"{inner_where}.schema")  # checked first: closing copies it through json
        return schema_spec(closed_objects(inner["schema"]), spec.where) if inner.get("strict") else spec
    if kind in ("regex", "lark"):
        _only(obj, where, ("type", "value"))
        text = obj.get("value")
        if not isinstance(text, str) or not text:
            raise GrammarError(f"{where}.value must be a non-empty string, got {text!r}")
        return GrammarSpec(kind, _text(_sized(text, f"{where}.value"), f"{where}.value"), where)
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


def schema_spec(schema: Any, where: str) -> GrammarSpec:
    """A JSON schema as a constraint: an object, nested at most MAX_DEPTH levels, JSON and
    text all through (about 30 ms for 600 KB, what parsing it cost). Whether llguidance
    takes it `compile_grammar` finds out, off the thread that received it."""
    levels = [_object(schema, where)]
    for depth in range(MAX_DEPTH + 1):
        if not levels:
            break
        if depth == MAX_DEPTH:
            raise GrammarError(f"{where} is nested deeper than {MAX_DEPTH} levels, the limit")
        levels = [item for value in levels for item in (value.values() if type(value) is dict else value)
                  if type(item) in (dict, list, tuple)]
    try:
        source = json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"{where} is not JSON: {e}") from None
    return GrammarSpec("json_schema", _text(_sized(source, f"{where} as JSON"), where), where)


# Where a subschema stands for the same value as its parent, so closing it alone would refuse
# the properties its siblings declare; and where closing would change what a test means.
_MERGED = ("allOf", "dependentSchemas", "not", "if")


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema that does not say what other keys it
    takes has `additionalProperties: false`, as OpenAI's strict mode reads a schema: a
    client that declares parameters gets those and no others. Left open: an object that
    sets additionalProperties or unevaluatedProperties, combines schemas (allOf, anyOf,
    oneOf, $ref: its keys come from elsewhere), or requires a key it does not declare
    (closed, it could never be written). A JSON schema's default is open, so only strict
    requests and tool arguments are closed."""
    if not isinstance(schema, dict):
        return schema
    root = json.loads(json.dumps(schema))  # a copy; schema_spec checked it is JSON
    todo = [(root, False)]
    while todo:  # not recursive: a schema given through the Python API has no depth check
        node, merged = todo.pop()
        if not merged and _open_object(node):
            node["additionalProperties"] = False
        for _, container, key in _subschemas(node):
            if isinstance(container[key], dict):
                todo.append((container[key], container is node and key in _MERGED
                             or any(node.get(k) is container for k in _MERGED)))
    return root


def _open_object(node: dict[str, Any]) -> bool:
    kinds = node.get("type", "object" if "properties" in node else None)
    declared, required = node.get("properties", {}), node.get("required", [])
    return ((kinds == "object" or isinstance(kinds, list) and "object" in kinds)
            and not any(k in node for k in ("additionalProperties", "unevaluatedProperties", "allOf", "anyOf",
                                             "oneOf", "$ref"))
            and isinstance(declared, dict) and isinstance(required, list)
            and ("patternProperties" in node or all(k in declared for k in required)))


def _sized(text: str, what: str) -> str:
    if len(text) > MAX_SOURCE:
        raise GrammarError(f"{what} is {len(text)} characters, more than the limit of {MAX_SOURCE}")
    return text


def _text(text: str, where: str) -> str:
    """`text`, if UTF-8 can carry it: JSON's "\\ud800" gives a lone surrogate, which it cannot."""
    if not encodable(text):
        raise GrammarError(f"{where} holds a lone surrogate (\\ud800-\\udfff), which is not text")
    return text


def _schema_grammar(schema: dict[str, Any] | str, where: str) -> str:
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_LAYOUT)
    except ValueError as e:  # what JSON reads but llguidance does not (a number past f64)
        raise GrammarError(f"{where}: {_one_line(str(e))}") from None


def _invalid(grammar: str) -> str:
    """llguidance's error for `grammar` (within `_LIMITS`), or "" when it is valid."""
    llguidance = _llguidance()
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, limits=llguidance.LLParserLimits(**_LIMITS))
    return messages[0] if failed else ""


def _blame(schema: dict[str, Any], error: str, until: float, where: str) -> tuple[str, str]:
    """Where in `schema` llguidance's `error` is, and the most specific message for it:
    its messages name the fault but not the place. Subschemas are replaced by {} (any
    value), half of a node's at a time, down to the smallest whose removal clears the
    error; then each of its keywords is dropped. The path is "" for the schema as a
    whole. The subschema checked alone may say more ("minItems (5) is greater than
    maxItems (2)" where the whole says "required property 'x' is unsatisfiable").
    `schema` is the caller's own copy: it is changed while searching, and restored."""
    holder: dict[str, Any] = {"": schema}
    checks = iter(range(_BLAME_CHECKS))

    def gone() -> bool:
        # Out of checks or time, the search stops narrowing down and blames where it got to.
        return (next(checks, None) is not None and time.monotonic() < until
                and _invalid(_schema_grammar(holder[""], where)) != error)

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
        alone = _invalid(_schema_grammar({**defs, **node}, where)) if path and time.monotonic() < until else ""
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
    """llguidance's view of one Tokenizer with one set of EOS ids, and its compiled grammars:
    the last `_MAX_COMPILED` that ran, and any other a request still holds."""

    def __init__(self, tokenizer: Tokenizer, eos: tuple[int, ...]) -> None:
        # Kept: the tokenizers library counts its vocabulary anew on every call (37 ms at 49k).
        self.vocab_size = tokenizer.vocab_size
        self.eos = eos
        self.ll = _llguidance().LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=self.vocab_size,
                                            eos_token=list(eos))
        self.compiled: OrderedDict[tuple[str, str], _Compiled] = OrderedDict()
        self.held: weakref.WeakValueDictionary[tuple[str, str], _Compiled] = weakref.WeakValueDictionary()

    def find(self, key: tuple[str, str]) -> _Compiled | None:
        compiled = self.compiled.get(key) or self.held.get(key)
        if compiled is not None:
            self.keep(compiled)
        return compiled

    def keep(self, compiled: _Compiled) -> None:
        self.compiled[compiled.key] = compiled
        self.compiled.move_to_end(compiled.key)
        self.held[compiled.key] = compiled
        while len(self.compiled) > _MAX_COMPILED:
            self.compiled.popitem(last=False)


class _Compiled:
    """A grammar compiled for a bridge: its matcher is never advanced (each request gets a
    copy, which shares its lexer: the lexer's memory stays with this matcher)."""

    def __init__(self, matcher: Any, bridge: _Bridge, key: tuple[str, str]) -> None:
        self.matcher = matcher
        self.bridge = bridge
        self.key = key

    def forget(self) -> None:
        """Drop it from the cache: it failed in a run (a parser limit reached), so its memory
        goes once the requests that hold it end."""
        with _LOCK:
            if self.bridge.compiled.get(self.key) is self:
                del self.bridge.compiled[self.key]


_BRIDGES: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, ...], _Bridge]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()  # held for lookups only, never while compiling


def compile_grammar(spec: GrammarSpec, tokenizer: Tokenizer,
                    eos_token_ids: Sequence[int] | None = None) -> Grammar:
    """`spec` validated and bound to `tokenizer`: GrammarError naming the path at fault, or
    the limit it passed. The grammar allows an EOS id (the tokenizer's unless
    `eos_token_ids` is given, e.g. a chat template's end-of-turn) only where it accepts.
    llguidance's view of a tokenizer (0.3-0.8 s for 49k tokens) is kept for as long as the
    Tokenizer lives, and with it the grammars that compiled and ran (`_Bridge`)."""
    eos = tuple(int(t) for t in (tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids))
    if not eos:
        raise GrammarError(f"{spec.where}: a grammar needs at least one EOS token id")
    with _LOCK:
        bridge = _BRIDGES.setdefault(tokenizer, {}).get(eos)
    if bridge is None:
        made = _Bridge(tokenizer, eos)
        with _LOCK:
            bridge = _BRIDGES[tokenizer].setdefault(eos, made)
    key = (spec.kind, spec.source)
    with _LOCK:
        compiled = bridge.find(key)
    if compiled is None:
        try:
            compiled = _Compiled(_compile(spec, bridge), bridge, key)
        except GrammarError as exc:  # its field is the request parameter `where` starts with, for fronts to spell
            exc.field = exc.field or re.match(r"\w+", spec.where).group()
            raise
        with _LOCK:
            bridge.keep(compiled)
    return Grammar(compiled, spec.where)


def _compile(spec: GrammarSpec, bridge: _Bridge) -> Any:
    """llguidance's matcher for `spec`, validated, within `_LIMITS`, and run one step: its
    first mask and a token that mask allows. A grammar whose lexer explodes fails there,
    and is never cached."""
    deadline = time.monotonic() + COMPILE_SECONDS
    grammar = _validated(spec, deadline)
    _in_time(spec, deadline)
    llguidance = _llguidance()
    matcher = llguidance.LLMatcher(bridge.ll, grammar, log_level=0, limits=llguidance.LLParserLimits(**_LIMITS))
    error = matcher.get_error() if matcher.is_error() else _first_step(matcher, bridge)
    if error:
        matcher = None  # its lexer's memory goes now, not with the error's traceback
        raise _refused(spec.where, error)
    _in_time(spec, deadline)
    return matcher


def _validated(spec: GrammarSpec, deadline: float) -> str:
    """llguidance's form of `spec`; GrammarError naming the path at fault when it is invalid."""
    matcher = _llguidance().LLMatcher
    if spec.kind == "json_schema":
        grammar = _schema_grammar(spec.source, spec.where)
    else:
        grammar = matcher.grammar_from_regex(spec.source) if spec.kind == "regex" else \
            matcher.grammar_from_lark(spec.source)
    error = _invalid(grammar)
    if not error:
        return grammar
    if _LIMITED.search(error):  # a limit of the whole: no one part is at fault
        raise _refused(spec.where, error)
    until = min(deadline, time.monotonic() + _BLAME_SECONDS)
    if spec.kind == "json_schema":
        path, detail = _blame(json.loads(spec.source), error, until, spec.where)
        raise GrammarError(f"{spec.where}{path}: {_one_line(detail)}")
    for where, schema in spec.parts:
        if part_error := _invalid(_schema_grammar(schema, where)):
            path, detail = _blame(json.loads(schema if isinstance(schema, str) else json.dumps(schema)),
                                  part_error, until, where)
            raise GrammarError(f"{where}{path}: {_one_line(detail)}")
    raise GrammarError(f"{spec.where}.value: {_one_line(error)}")


# llguidance's messages when one of `_LIMITS` stopped it.
_LIMITED = re.compile(r"too many|too big|fuel", re.IGNORECASE)


def _refused(where: str, message: str) -> GrammarError:
    """llguidance's `message` about the grammar at `where`, saying so when a limit refused it."""
    past = " (past this service's limits for compiling a grammar)" if _LIMITED.search(message) else ""
    return GrammarError(f"{where}: {_one_line(message)}{past}")


def _first_step(matcher: Any, bridge: _Bridge) -> str:
    """llguidance's error on the first step under `matcher` (on a copy), or ""."""
    probe = matcher.deep_copy()
    mask = np.zeros((bridge.vocab_size + 31) // 32, dtype=np.int32)
    probe.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    if not probe.is_error():
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[: bridge.vocab_size]
        bits[list(bridge.eos)] = 0
        if (allowed := np.flatnonzero(bits)).size:
            probe.consume_token(int(allowed[0]))
    return probe.get_error() if probe.is_error() else ""


def _in_time(spec: GrammarSpec, deadline: float) -> None:
    if time.monotonic() > deadline:
        raise GrammarError(f"{spec.where}: compiling it took longer than {COMPILE_SECONDS:g} s, "
                           "this service's limit")


class Grammar:
    """A grammar compiled for one tokenizer, named by the request field it came from;
    `start()` gives each request its own state."""

    def __init__(self, compiled: _Compiled, where: str) -> None:
        self._compiled = compiled
        self.vocab_size = compiled.bridge.vocab_size
        self.where = where

    def start(self) -> GrammarState:
        return GrammarState(self._compiled.matcher.deep_copy(), self.vocab_size, self.where, self._compiled.forget)


class GrammarState:
    """One request's position in its grammar, and the processor that keeps it there.

    Call it as a processor `(tokens, logits) -> logits`: ids the grammar forbids at this
    point become -inf, as do the rows past the tokenizer's vocabulary (a model's logits
    may be wider). It writes into a writable float32 row and returns it; other rows are
    copied. `tokens` is unused: the state follows `advance`, called once per kept token.
    """

    def __init__(self, matcher: Any, vocab_size: int, where: str, failed: Callable[[], None]) -> None:
        self._matcher = matcher
        self._vocab = vocab_size
        self._where = where
        self._failed = failed  # told when the grammar fails, so that it leaves the cache
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
            self._failed()
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
            self._failed()
            raise _refused(self._where, self._matcher.get_error())

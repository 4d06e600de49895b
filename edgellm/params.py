"""The generation-parameter contract, declared once in `PARAMS`.

Every front derives from it: the Python API validates with `GenerationParams.build`,
the CLI builds its flags from it (`edgellm.cli.args`), every front validates a
request's parameter fields with `from_wire` (through its own table of field names), and
the published request schema's parameter properties are `wire_schema()`. A request is
checked once: `from_wire` returns a `Checked` mapping, which `GenerationParams.build`
(on the front's thread, `Engine.params`) trusts, and the frozen GenerationParams it makes
is what the engine's worker decodes, without checking anything again. tests/test_params.py checks all four
at every boundary, so a range written here is the range everywhere.

Values follow JSON, since most requests arrive as JSON: an integer parameter also
takes 2.0 (JSON Schema counts it as an integer, and some device JSON writers print
every number with a fraction), and a boolean is never a number.
"""
from __future__ import annotations

import json
import math
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .errors import GenerationError

if TYPE_CHECKING:
    from .grammar import GrammarSpec
    from .tools import Tool, ToolChoice

Cancel = threading.Event | Callable[[], bool]

# Kinds of value; each has one checker below and, on the wire, one schema.
INT, NUMBER, BOOL, STRINGS, TOKEN_IDS, LOGIT_BIAS, CHOICE, CANCEL, OBJECT, TOOLS, TOOL_CHOICE = (
    "int", "number", "bool", "strings", "token_ids", "logit_bias", "choice", "cancel", "object", "tools",
    "tool_choice")
STRING = "string"  # one non-empty string of at most max_length characters
RETRIEVAL = "retrieval"  # {"index": NAME, "k": K}: a served index and how many of its chunks
REASONING_MODES = ("separate", "hide", "inline", "off")  # edgellm.reasoning.MODES, without importing numpy here

# Wire logit-bias keys are token ids written as JSON object keys: ASCII digits only
# ("²" passes str.isdigit but not int()), nine at most (every vocabulary fits).
_BIAS_KEY_DIGITS = 9


@dataclass(frozen=True)
class Param:
    """One parameter: what it takes, what it means, and which fronts expose it.

    `low`/`high` bound a number (for `logit_bias`, each bias); an `_open` end
    excludes the bound itself. `wire` is the MQTT field name (None: not on the wire);
    the CLI flag is `--` plus the wire name, so both fronts spell it alike.
    """

    name: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None means "not set"
    max_items: int | None = None  # entries of a list or mapping
    max_length: int | None = None  # characters of each string
    choices: tuple[Any, ...] = ()  # for an OBJECT, the "type" values it takes
    wire: str | None = None
    cli: bool = False
    short: str | None = None  # CLI short flag

    @property
    def flag(self) -> str:
        return "--" + (self.wire or self.name).replace("_", "-")

    def range(self) -> str:
        """The bounds as a reader writes them: ">= 1", "in (0, 1]", or ""."""
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{_num(self.low)}, "
                    f"{_num(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return ""

    def in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


PARAMS: tuple[Param, ...] = (
    Param("max_new_tokens", INT, 256, "most tokens to generate", low=1, wire="max_tokens", cli=True, short="-n"),
    Param("temperature", NUMBER, 0.0, "0 = greedy", low=0, wire="temperature", cli=True),
    Param("top_k", INT, 0, "sample from the k most likely tokens (0 = off)", low=0, wire="top_k", cli=True),
    Param("top_p", NUMBER, 1.0, "sample from the smallest set of tokens holding this much probability (1 = off)",
          low=0, high=1, low_open=True, wire="top_p", cli=True),
    Param("min_p", NUMBER, 0.0, "drop tokens less likely than this fraction of the best one (0 = off)",
          low=0, high=1, high_open=True, wire="min_p", cli=True),
    Param("repetition_penalty", NUMBER, 1.0, "Hugging Face's: divide the logits of tokens already seen (1 = off)",
          low=0, low_open=True, wire="repetition_penalty", cli=True),
    Param("presence_penalty", NUMBER, 0.0, "OpenAI's: subtract once from each token already seen",
          low=-2, high=2, wire="presence_penalty", cli=True),
    Param("frequency_penalty", NUMBER, 0.0, "OpenAI's: subtract once per earlier occurrence of a token",
          low=-2, high=2, wire="frequency_penalty", cli=True),
    Param("penalty_window", INT, None, "the penalties look at this many last tokens (default: all)",
          low=1, optional=True, wire="penalty_window", cli=True),
    Param("logit_bias", LOGIT_BIAS, None, "token id -> bias added to its logit (-100 bans, 100 forces)",
          low=-100, high=100, optional=True, max_items=300, wire="logit_bias"),
    Param("seed", INT, None, "makes sampling reproducible", low=0, high=(1 << 63) - 1, optional=True,
          wire="seed", cli=True),
    Param("stop", STRINGS, (), "a string that ends the answer; it is not included in the output",
          max_items=8, max_length=128, wire="stop", cli=True),
    Param("stop_token_ids", TOKEN_IDS, (), "token ids that end the answer, besides EOS"),
    Param("ignore_eos", BOOL, False, "run to max_new_tokens whatever is sampled (benchmarks)"),
    Param("cancel", CANCEL, None, "a threading.Event or a callable; once set, the stream ends 'cancelled'",
          optional=True),
    Param("add_generation_prompt", BOOL, True, "end a chat with the template's assistant header"),
    Param("truncate", CHOICE, None, "'left': drop the oldest prompt tokens that do not fit", optional=True,
          choices=("left",)),
    Param("response_format", OBJECT, None, "OpenAI's: {\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
          "\"json_schema\": {\"name\", \"schema\", \"strict\"}}; the output is held to it",
          optional=True, choices=("text", "json_object", "json_schema"), wire="response_format"),
    Param("grammar", OBJECT, None, "{\"type\": \"regex\" or \"lark\", \"value\": \"...\"}; the output is held to it",
          optional=True, choices=("regex", "lark"), wire="grammar"),
    Param("tools", TOOLS, (), "OpenAI function tools the model may call (chat messages only); calls come back "
          "as tool_calls", max_items=64, wire="tools"),
    Param("tool_choice", TOOL_CHOICE, None, "\"auto\" (default with tools), \"none\", \"required\" or "
          "{\"type\": \"function\", \"function\": {\"name\": ...}}; required and named calls are held to the "
          "function's parameter schema", optional=True, choices=("auto", "none", "required"), wire="tool_choice"),
    Param("parallel_tool_calls", BOOL, None, "OpenAI's: false allows at most one call per reply (default: true "
          "where the chat template renders tools, false for the fallback prompt of a model never taught them)",
          optional=True, wire="parallel_tool_calls"),
    Param("reasoning", CHOICE, None, "a reasoning model's think block: separate (default), hide, inline or off",
          optional=True, choices=REASONING_MODES, wire="reasoning", cli=True),
    Param("speculative", CHOICE, None, "prompt_lookup: draft tokens from n-grams of the prompt and answer and "
          "verify them in one step (same tokens, faster when the answer quotes its input); draft_model: a "
          "smaller model loaded as the draft guesses them; off",
          optional=True, choices=("off", "prompt_lookup", "draft_model"), wire="speculative", cli=True),
    Param("max_reasoning_tokens", INT, None, "close the think block after this many tokens", low=0, optional=True,
          wire="max_reasoning_tokens", cli=True),
    Param("cache_salt", STRING, None, "vLLM's: the request reuses cached prompt rows only of its own client's "
          "requests with the same salt (and prefixes the service declares shared)", optional=True, max_length=256,
          wire="cache_salt"),
    Param("retrieval", RETRIEVAL, None, "{\"index\": NAME, \"k\": K}: answer from the k chunks (default 4) of a "
          "served document index nearest the last user message, given to the model as numbered sources (chat "
          "messages only); they come back as citations", optional=True, low=1, high=16, max_length=1024,
          wire="retrieval"),
)
BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
BY_WIRE: dict[str, Param] = {p.wire: p for p in PARAMS if p.wire}


def _what(kind: str, p: Param) -> str:
    bounds = p.range()
    return f"{kind} {bounds}" if bounds else kind


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(p: Param, value: Any, field: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not p.in_range(value):
        raise GenerationError(f"{field} must be {_what('an integer', p)}, got {_short(value)}")
    return value


def _number(p: Param, value: Any, field: str) -> float:
    # An integer past float's range (JSON's 10**400) is as out of range as infinity; float() would raise.
    number = float(value) if _is_number(value) and abs(value) <= sys.float_info.max else math.nan
    if not math.isfinite(number) or not p.in_range(number):
        raise GenerationError(f"{field} must be {_what('a number', p)}, got {_short(value)}")
    return number


def _strings(p: Param, value: Any, field: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or len(items) > p.max_items \
            or not all(isinstance(s, str) and 0 < len(s) <= p.max_length for s in items):
        raise GenerationError(f"{field} must be a non-empty string or a list of at most {p.max_items} of them, "
                              f"each at most {p.max_length} characters, got {_short(value)}")
    return list(items)


def _token_ids(p: Param, value: Any, field: str, vocab_size: int | None) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise GenerationError(f"{field} must be a list of token ids, got {_short(value)}")
    top = "" if vocab_size is None else f" below {vocab_size}"
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
            raise GenerationError(f"{field}: {_short(t)} is not a token id{top}")
    return list(value)


def _logit_bias(p: Param, value: Any, field: str, vocab_size: int | None) -> dict[int, float]:
    if not isinstance(value, dict) or len(value) > p.max_items:
        raise GenerationError(f"{field} must be a mapping of token id to bias of at most {p.max_items} entries, "
                              f"got {_short(value)}")
    top = "" if vocab_size is None else f" and < {vocab_size}"
    bias = {}
    for token, b in value.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0 \
                or (vocab_size is not None and token >= vocab_size):
            raise GenerationError(f"{field} key must be a token id >= 0{top}, got {_short(token)}")
        bias[token] = _number(p, b, f"{field}[{token}]")
    return bias


def _grammar(p: Param, value: Any, field: str) -> "GrammarSpec | None":
    """A constraint of a checked shape (None for plain text); a GrammarSpec passes as it is.
    What it says is validated when it compiles, off the thread that received it."""
    from .grammar import GrammarSpec, parse_response_format  # imported here, not for --help

    if isinstance(value, GrammarSpec):
        return value
    if isinstance(value, dict) and value.get("type") not in p.choices:
        raise GenerationError(f"{field}.type must be one of {list(p.choices)}, got {_short(value.get('type'))}")
    return parse_response_format(value, field)


def _tools(p: Param, value: Any, field: str) -> "tuple[Tool, ...]":
    """Validated tools, their parameter schemas of a checked shape and, together, of the size
    one schema may have: they make one call grammar. What the schemas say is validated
    with it, off the thread that received them."""
    from .grammar import MAX_SOURCE, schema_spec
    from .tools import Tool, parse_tools

    if isinstance(value, (list, tuple)) and all(isinstance(t, Tool) for t in value):
        return tuple(value)
    if isinstance(value, list) and len(value) > p.max_items:
        raise GenerationError(f"{field} has {len(value)} tools, limit is {p.max_items}")
    tools = parse_tools(value)
    size = sum(len(schema_spec(tool.parameters, f"{field}[{i}].function.parameters").source)
               for i, tool in enumerate(tools))
    if size > MAX_SOURCE:
        raise GenerationError(f"{field}: the parameter schemas come to {size} characters of JSON, more than "
                              f"the limit of {MAX_SOURCE}")
    return tuple(tools)


@dataclass(frozen=True)
class Retrieval:
    """A request's `retrieval`: which index (a name `edgellm serve --index NAME=FILE` gave, or the
    file `edgellm run --index` names) and how many of its chunks."""

    index: str
    k: int = 4

    def to_wire(self) -> dict[str, Any]:
        return {"index": self.index, "k": self.k}


def _retrieval(p: Param, value: Any, field: str) -> Retrieval:
    if isinstance(value, Retrieval):
        return value
    if not isinstance(value, dict) or not set(value) <= {"index", "k"}:
        raise GenerationError(f'{field} must be {{"index": NAME, "k": {_num(p.low)}-{_num(p.high)}}}, '
                              f"got {_short(value)}")
    index = value.get("index")
    if not isinstance(index, str) or not 0 < len(index) <= p.max_length:
        raise GenerationError(f"{field}.index must be a non-empty string of at most {p.max_length} characters, "
                              f"got {_short(index)}")
    return Retrieval(index, _integer(p, value.get("k", Retrieval.k), f"{field}.k"))


def _short(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 192:  # repr() refuses past 4,300 digits
        return f"an integer of {int(math.log10(abs(value))) + 1} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(p: Param, value: Any, vocab_size: int | None = None, field: str | None = None) -> Any:
    """`value` validated and normalized (ints as int, numbers as float, lists as list).

    Token ids are checked against `vocab_size` when it is given. Raises GenerationError
    whose `field` is the parameter's name, its message spelling it as `field` (default: the
    parameter's name) and saying its range.
    """
    try:
        return _check(p, value, vocab_size, field or p.name)
    except GenerationError as exc:
        exc.field = exc.field or p.name
        raise


def _check(p: Param, value: Any, vocab_size: int | None, field: str) -> Any:
    if value is None and p.optional:
        return None
    if p.kind == INT:
        return _integer(p, value, field)
    if p.kind == NUMBER:
        return _number(p, value, field)
    if p.kind == BOOL:
        if not isinstance(value, bool):
            raise GenerationError(f"{field} must be true or false, got {_short(value)}")
        return value
    if p.kind == STRINGS:
        return _strings(p, value, field)
    if p.kind == STRING:
        if not isinstance(value, str) or not 0 < len(value) <= p.max_length:
            raise GenerationError(f"{field} must be a non-empty string of at most {p.max_length} characters, "
                                  f"got {_short(value)}")
        return value
    if p.kind == TOKEN_IDS:
        return _token_ids(p, value, field, vocab_size)
    if p.kind == LOGIT_BIAS:
        return _logit_bias(p, value, field, vocab_size)
    if p.kind == OBJECT:
        return _grammar(p, value, field)
    if p.kind == TOOLS:
        return _tools(p, value, field)
    if p.kind == TOOL_CHOICE:
        from .tools import parse_tool_choice

        return parse_tool_choice(value)
    if p.kind == RETRIEVAL:
        return _retrieval(p, value, field)
    if p.kind == CHOICE:
        if value not in p.choices:
            raise GenerationError(f"{field} must be one of {list(p.choices)} or None, got {_short(value)}")
        return value
    if not (isinstance(value, threading.Event) or callable(value)):  # CANCEL
        raise GenerationError(f"{field} must be a threading.Event or a callable, got {_short(value)}")
    return value


def check_all(values: Mapping[str, Any], vocab_size: int | None = None) -> dict[str, Any]:
    """Validate keyword parameters by their API names; unknown names are refused."""
    for name in values:
        if name not in BY_NAME:
            raise GenerationError(f"unknown generation parameter {name!r}", field=name)
    return {name: check(BY_NAME[name], value, vocab_size) for name, value in values.items()}


def check_together(params: Mapping[str, Any], spelled: Callable[[str], str] = lambda name: name) -> "ToolChoice | None":
    """Refuse parameters that are valid alone but not together (names as `spelled`); the tool
    choice settled against the tools (None when the request has neither).

    A stop string could cut a constrained answer short of valid JSON, two constraints
    cannot both hold, and a call is held to its schema only if no grammar competes."""
    constraints = [name for name in ("response_format", "grammar") if params.get(name) is not None]
    if len(constraints) == 2:
        raise GenerationError(f"{spelled('response_format')} and {spelled('grammar')} cannot both be set",
                              field="response_format")
    choice = None
    if params.get("tools") or params.get("tool_choice") is not None:
        from .tools import settle_choice

        choice = settle_choice(params.get("tool_choice"), params.get("tools") or ())
        if choice.mode in ("required", "function"):
            constraints.append("tool_choice")
        if choice.mode != "none" and params.get("grammar") is not None:
            raise GenerationError(f"{spelled('grammar')} cannot be combined with {spelled('tools')}; "
                                  f"use {spelled('response_format')} for the answer that is not a call",
                                  field="grammar")
    if constraints and params.get("stop"):
        raise GenerationError(f"{spelled('stop')} cannot be combined with {spelled(constraints[0])}: "
                              f"a stop string could cut the constrained output short of valid", field="stop")
    return choice


class Checked(dict):
    """Parameters `checked` returned (by API name, each valid, valid together, the tool choice
    settled): `GenerationParams.build` trusts them as they are, so a request parsed where it
    arrived is not checked again on the worker."""


def checked(values: Mapping[str, Any], vocab_size: int | None = None) -> Checked:
    """`values` (API names) validated alone and together; a Checked comes back as it is."""
    if isinstance(values, Checked):
        return values
    out = Checked(check_all(values, vocab_size))
    if (choice := check_together(out)) is not None:
        out["tool_choice"] = choice
    return out


def constrained(params: Mapping[str, Any]) -> bool:
    """Whether the output is held to a grammar from its first token (then a bundle's default
    stop strings give way)."""
    choice = params.get("tool_choice")
    forced = params.get("tools") and choice is not None and choice.mode in ("required", "function")
    return bool(forced) or any(params.get(name) is not None for name in ("response_format", "grammar"))


@dataclass(frozen=True)
class GenerationParams:
    """Every knob of one request, validated; unset sampling knobs mean greedy.

    The fields and defaults mirror `PARAMS` (a test holds them equal); they are
    written out so that type checkers and readers see them.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_window: int | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    cancel: Cancel | None = None
    add_generation_prompt: bool = True
    truncate: str | None = None
    response_format: GrammarSpec | None = None
    grammar: GrammarSpec | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None  # settled in __post_init__: never None on a built value
    parallel_tool_calls: bool | None = None
    reasoning: str | None = None
    speculative: str | None = None
    max_reasoning_tokens: int | None = None
    cache_salt: str | None = None
    retrieval: Retrieval | None = None

    @classmethod
    def build(cls, defaults: Mapping[str, Any], params: Mapping[str, Any], vocab_size: int,
              ceiling: int | None = None) -> "GenerationParams":
        """Request params over the bundle's defaults, validated (GenerationError names the first bad one);
        `Checked` ones (a front's `from_wire`, a model's defaults) only against the vocabulary.

        A bundle's default stop strings give way to a request's constraint. `ceiling`: the most
        tokens a service lets one request generate; a budget above it is refused, and without one
        the default is held to it."""
        request = checked(params, vocab_size)
        _in_vocab(request, vocab_size)
        defaults = checked(defaults, vocab_size)
        if constrained(request):
            defaults = {k: v for k, v in defaults.items() if k != "stop"}
        merged = {**defaults, **request}
        asked = request.get("max_new_tokens")
        if ceiling is not None and asked is not None and asked > ceiling:
            raise GenerationError(f"max_new_tokens is {asked}, this service allows at most {ceiling}",
                                  field="max_new_tokens")
        if ceiling is not None and merged.get("max_new_tokens", cls.max_new_tokens) > ceiling:
            merged["max_new_tokens"] = ceiling
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})

    def __post_init__(self) -> None:
        if self.tool_choice is None:  # OpenAI's default, settled once (a given choice was, by `checked`)
            from .tools import settle_choice

            object.__setattr__(self, "tool_choice", settle_choice(None, self.tools))

    def cancelled(self) -> Callable[[], bool]:
        if self.cancel is None:
            return lambda: False
        return self.cancel.is_set if isinstance(self.cancel, threading.Event) else self.cancel


# -- the wire ------------------------------------------------------------------


def from_wire(data: Mapping[str, Any], names: Mapping[str, str] | None = None) -> Checked:
    """The parameter fields of a wire request, by API name, checked once (`Checked`: the worker
    trusts them).

    `names` is a front's one table of its own spellings (API name -> its field; default the
    MQTT wire's, `WIRE`): the fields are read under those names, and other fields are ignored
    (the protocol owns them). Errors name the parameter by its API name (`field`); each front
    spells it as its clients do (`spelled`, with the same table).
    """
    names = WIRE if names is None else names
    params = {}
    for name, wire in names.items():
        p = BY_NAME.get(name)
        if p is None or wire not in data:
            continue
        value = data[wire]
        if p.kind == LOGIT_BIAS and isinstance(value, dict):
            value = {_bias_key(key): b for key, b in value.items()}
        params[p.name] = check(p, value)
    out = Checked(params)
    if (choice := check_together(out)) is not None:
        out["tool_choice"] = choice
    return out


def _in_vocab(params: Mapping[str, Any], vocab_size: int) -> None:
    """Token ids checked (and checked alone) without knowing the model are below its vocabulary."""
    for name in ("logit_bias", "stop_token_ids"):
        ids = params.get(name) or ()
        if (bad := next((t for t in ids if t >= vocab_size), None)) is not None:
            raise GenerationError(f"{name}: {bad} is not a token id below {vocab_size}", field=name)


def _bias_key(key: str) -> int:
    if not (0 < len(key) <= _BIAS_KEY_DIGITS and key.isascii() and key.isdigit()):
        raise GenerationError(f"logit_bias key must be a token id of 1-{_BIAS_KEY_DIGITS} digits, got {_short(key)}",
                              field="logit_bias")
    return int(key)


# How the MQTT wire (and, but for what they rename, the HTTP fronts) spells each parameter.
WIRE: dict[str, str] = {p.name: p.wire for p in PARAMS if p.wire}


def spelled(exc: GenerationError, names: Mapping[str, str]) -> str:
    """`exc`'s message with the parameter it names spelled as a front's table `names` has it.

    The message starts with its field (`exc.field`, an API name) or a path inside it; `names`
    maps API names, and paths inside them a front spells apart (Ollama's `format` is
    `response_format.json_schema.schema`), to the front's spelling. The longest that fits wins."""
    message, field = str(exc), exc.field
    if field is None:
        return message
    paths = [path for path in names if (path == field or path.startswith((field + ".", field + "[")))
             and message.startswith(path) and not message[len(path):len(path) + 1].isidentifier()]
    if not paths:
        return message
    path = max(paths, key=len)
    return names[path] + message[len(path):]


def to_wire(params: Mapping[str, Any]) -> dict[str, Any]:
    """API-named, validated parameters as wire fields (JSON-ready)."""
    out = {}
    for name, value in params.items():
        p = BY_NAME[name]
        if p.wire is None:
            raise GenerationError(f"{name} cannot be sent over MQTT")
        if p.kind == LOGIT_BIAS and value is not None:
            value = {str(k): v for k, v in value.items()}
        elif p.kind == STRINGS:
            value = list(value)
        elif p.kind == OBJECT and value is not None and not isinstance(value, dict):
            value = _grammar_wire(value)
        elif p.kind == TOOLS:
            value = [t if isinstance(t, dict) else t.to_openai() for t in value]
        elif p.kind == RETRIEVAL and isinstance(value, Retrieval):
            value = value.to_wire()
        elif p.kind == TOOL_CHOICE and value is not None and not isinstance(value, (str, dict)):
            value = value.mode if value.mode != "function" else {"type": "function",
                                                                   "function": {"name": value.name}}
        out[p.wire] = value
    return out


def _grammar_wire(spec: "GrammarSpec") -> dict[str, Any]:
    if spec.kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"schema": json.loads(spec.source)}}
    return {"type": spec.kind, "value": spec.source}


def wire_schema() -> dict[str, dict[str, Any]]:
    """JSON Schema (2020-12) properties of the wire parameters, in declaration order."""
    return {p.wire: {**_schema(p), "description": p.help} for p in PARAMS if p.wire}


def _bounds(p: Param) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p.low is not None:
        out["exclusiveMinimum" if p.low_open else "minimum"] = p.low
    if p.high is not None:
        out["exclusiveMaximum" if p.high_open else "maximum"] = p.high
    return out


def _schema(p: Param) -> dict[str, Any]:
    if p.kind in (INT, NUMBER):
        return {"type": "integer" if p.kind == INT else "number", **_bounds(p)}
    if p.kind in (STRING, STRINGS):
        one = {"type": "string", "minLength": 1, "maxLength": p.max_length}
        return one if p.kind == STRING else {"oneOf": [one, {"type": "array", "maxItems": p.max_items, "items": one}]}
    if p.kind == LOGIT_BIAS:
        return {"type": "object", "maxProperties": p.max_items,
                "propertyNames": {"pattern": f"^[0-9]{{1,{_BIAS_KEY_DIGITS}}}$"},
                "additionalProperties": {"type": "number", **_bounds(p)}}
    if p.kind == OBJECT:
        return _object_schema(p)
    if p.kind == CHOICE:
        return {"enum": list(p.choices)}
    if p.kind == BOOL:
        return {"type": "boolean"}
    if p.kind == TOOLS:
        function = {"type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                                   "description": {"type": "string"},
                                   "parameters": {"type": "object", "properties": {"type": {"const": "object"}}},
                                   "strict": {"type": "boolean"}}}
        return {"type": "array", "maxItems": p.max_items,
                "items": {"type": "object", "required": ["type", "function"], "additionalProperties": False,
                          "properties": {"type": {"const": "function"}, "function": function}}}
    if p.kind == TOOL_CHOICE:
        named = {"type": "object", "required": ["type", "function"], "additionalProperties": False,
                 "properties": {"type": {"const": "function"},
                                "function": {"type": "object", "required": ["name"], "additionalProperties": False,
                                             "properties": {"name": {"type": "string"}}}}}
        return {"oneOf": [{"enum": list(p.choices)}, named]}
    if p.kind == RETRIEVAL:
        return {"type": "object", "required": ["index"], "additionalProperties": False,
                "properties": {"index": {"type": "string", "minLength": 1, "maxLength": p.max_length},
                               "k": {"type": "integer", **_bounds(p)}}}
    raise AssertionError(f"{p.name}: no wire schema for kind {p.kind!r}")


def _object_schema(p: Param) -> dict[str, Any]:
    """The shapes `grammar.parse_response_format` takes for `p`; what is inside a schema or
    a grammar only the compiler can check."""
    shapes = []
    for kind in p.choices:
        fields: dict[str, Any] = {"type": {"const": kind}}
        if kind == "json_schema":
            fields["json_schema"] = {
                "type": "object", "required": ["schema"], "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                               "strict": {"type": "boolean"}, "schema": {"type": "object"}}}
        elif kind in ("regex", "lark"):
            fields["value"] = {"type": "string", "minLength": 1}
        shapes.append({"type": "object", "required": list(fields), "additionalProperties": False,
                       "properties": fields})
    return {"oneOf": shapes}

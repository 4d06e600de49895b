"""edgellm/grammar.py: request shapes, schema errors with paths, and constrained sampling.

Generations sample at temperature 1.0 from random logits through the real sampler, on
a byte-level BPE vocabulary (SmolLM2/Qwen style) and a SentencePiece byte-fallback one
(Llama style): whatever the "model" prefers, every output must parse and validate,
and EOS must be open exactly where the grammar accepts.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgellm.errors import ExportError, GenerationError, GrammarError
from edgellm.grammar import compile_grammar, parse_response_format
from edgellm.sampling import make_sampler
from edgellm.text import Tokenizer
from edgellm.export.gguf_vocab import build_tokenizer as gguf_tokenizer

from tiny import build_tokenizer

# Model logits wider than the tokenizer's vocabulary, as exported models often have.
EXTRA_ROWS = 13
# Every grammar below bounds its output well under this many tokens.
MAX_TOKENS = 1500

SCHEMA = {
    "type": "object",
    "properties": {
        "machine": {"type": "string", "minLength": 1, "maxLength": 12},
        "severity": {"enum": ["low", "medium", "high", "critical"]},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "count": {"type": "integer", "minimum": 3, "maximum": 250},
        "ok": {"type": "boolean"},
        "causes": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "part": {"enum": ["bearing", "motor", "belt"]},
                    "p": {"type": "number", "minimum": 0, "maximum": 1},
                    "note": {"type": ["string", "null"], "maxLength": 8},
                },
                "required": ["part", "p"],
                "additionalProperties": False,
            },
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 4},
    },
    "required": ["machine", "severity", "score", "count", "causes"],
    "additionalProperties": False,
}

REGEX = r"(0|[1-9][0-9]{0,2})\.[0-9]{2} (EUR|USD)( [a-z]{1,6}){0,3}"

LARK = r"""
start: command (";" command)*
command: "turn " STATE " the " DEVICE | "set " DEVICE " to " LEVEL "%"
STATE: "on" | "off"
DEVICE: "light" | "fan" | "heater"
LEVEL: /[0-9]{1,3}/
"""
_COMMAND = r"(turn (on|off) the (light|fan|heater)|set (light|fan|heater) to [0-9]{1,3}%)"
LARK_LANGUAGE = re.compile(rf"{_COMMAND}(;{_COMMAND})*")


def json_schema(schema: object) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def _spm() -> Tokenizer:
    """A SentencePiece byte-fallback vocabulary (Llama style: <0x0A> bytes, ▁ for space)
    built the way a GGUF's is, with a few merged pieces."""
    space = "\u2581"
    pieces = [space, space * 2, "{", "}", '"', ":", ",", "[", "]", "e", "n", "o", "l", "t", "r",
              "u", "s", "h", "th", "the", "1", "0", ".", '":', '",', space + '"', "tr", "ue", "true", "null",
              space + "the", "light", "fan", "motor", "low"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(len(p)) for p in pieces],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    return Tokenizer(gguf_tokenizer(meta), bos_token_id=1, eos_token_ids=[2], add_bos_token=True)


@pytest.fixture(scope="module", params=["byte_level_bpe", "sentencepiece"])
def tok(request) -> Tokenizer:
    if request.param == "sentencepiece":
        return _spm()
    # Two EOS ids, as a chat model's end-of-text and end-of-turn.
    return Tokenizer(build_tokenizer(), bos_token_id=None, eos_token_ids=[0, 2])


def char_id(tok: Tokenizer, char: str) -> int:
    """The token of one ASCII character: a piece, or SentencePiece's byte token."""
    found = tok.token_to_id(char)
    return found if found is not None else tok.token_to_id(f"<0x{ord(char):02X}>")


def generate(grammar, tok: Tokenizer, seed: int, favour: str = "") -> str:
    """Sample under `grammar` until EOS or the grammar is done, checking the mask at
    every step: EOS open exactly when accepting, rows past the vocabulary closed.
    Tokens holding a character of `favour` get +3 on their logits."""
    state = grammar.start()
    rng = np.random.default_rng(seed)
    sample = make_sampler(temperature=1.0, seed=seed)
    eos = list(tok.eos_token_ids)
    vocab = tok.vocab_size  # 37 ms on a 49k vocabulary: read it once
    bias = np.zeros(vocab + EXTRA_ROWS, dtype=np.float32)
    if favour:
        bias[[i for i in range(vocab) if set(tok.decode([i])) & set(favour)]] = 3.0
    ids: list[int] = []
    for _ in range(MAX_TOKENS):
        logits = rng.standard_normal(bias.shape[0]).astype(np.float32) + bias
        masked = state(np.asarray(ids, dtype=np.int64), logits)
        assert np.isneginf(masked[vocab:]).all()
        assert (np.isfinite(masked[eos]) == state.accepting).all(), tok.decode(ids)
        token = sample(masked)
        if token in eos:
            return tok.decode(ids)
        state.advance(token)
        ids.append(token)
        if state.done:
            return tok.decode(ids)
    pytest.fail(f"no end after {MAX_TOKENS} tokens: {tok.decode(ids)[:200]!r}")


def test_nested_schema_always_validates(tok):
    grammar = compile_grammar(parse_response_format(json_schema(SCHEMA)), tok)
    outputs = [generate(grammar, tok, seed) for seed in range(50)]
    for text in outputs:
        jsonschema.validate(json.loads(text), SCHEMA)
    # Random logits explore the schema: optional keys, nulls and several causes all occur.
    values = [json.loads(t) for t in outputs]
    assert any("tags" in v for v in values) and any("tags" not in v for v in values)
    assert len({len(v["causes"]) for v in values}) == 3
    assert len({v["severity"] for v in values}) == 4


def test_json_object_always_parses(tok):
    """Any JSON object: strings have no bound, so the random model favours quotes and
    closing brackets as a real one does, or a string would run for hundreds of tokens."""
    grammar = compile_grammar(parse_response_format({"type": "json_object"}), tok)
    values = [json.loads(generate(grammar, tok, seed, favour='"}]')) for seed in range(50)]
    assert all(isinstance(v, dict) for v in values)
    assert any(len(v) > 1 for v in values)


def test_regex_always_matches(tok):
    grammar = compile_grammar(parse_response_format({"type": "regex", "value": REGEX}, "grammar"), tok)
    outputs = {generate(grammar, tok, seed) for seed in range(50)}
    assert all(re.fullmatch(REGEX, text) for text in outputs), outputs
    assert len(outputs) > 40


def test_lark_always_matches(tok):
    grammar = compile_grammar(parse_response_format({"type": "lark", "value": LARK}, "grammar"), tok)
    outputs = {generate(grammar, tok, seed) for seed in range(50)}
    assert all(LARK_LANGUAGE.fullmatch(text) for text in outputs), outputs
    assert any(";" in text for text in outputs)


def test_sentencepiece_bytes_and_spaces():
    """Newline and é exist only as <0xXX> byte tokens, the space only inside ▁ pieces.
    llguidance allows a forced stretch of text only in the tokenizer's own (canonical)
    tokenization, so the expected pieces are what the tokenizer makes of the text."""
    tok = _spm()
    state = compile_grammar(parse_response_format({"type": "regex", "value": "no\né the"}, "g"), tok).start()
    # Drop the ▁ SentencePiece prepends to a whole text: generated text has none.
    pieces = tok.tokenizer.encode("no\né the", add_special_tokens=False).tokens[1:]
    assert pieces == ["n", "o", "<0x0A>", "<0xC3>", "<0xA9>", "\u2581the"]
    for piece in pieces:
        masked = state(np.zeros(0, dtype=np.int64), np.zeros(tok.vocab_size, dtype=np.float32))
        assert np.isfinite(masked[tok.token_to_id(piece)]), piece
        assert np.isneginf(masked[tok.eos_token_ids[0]])
        state.advance(tok.token_to_id(piece))
    assert state.accepting and state.done
    assert tok.decode([tok.token_to_id(p) for p in pieces]) == "no\né the"


def test_eos_closed_until_accepting_then_only_eos(tok):
    state = compile_grammar(parse_response_format({"type": "regex", "value": "(yes|no)!"}, "grammar"), tok).start()
    zeros = np.zeros(tok.vocab_size, dtype=np.float32)
    for char in "yes!":
        masked = state(np.zeros(0), zeros.copy())
        assert not state.accepting and np.isneginf(masked[list(tok.eos_token_ids)]).all()
        state.advance(char_id(tok, char))
    masked = state(np.zeros(0), zeros.copy())
    assert state.accepting and state.done
    assert sorted(np.flatnonzero(np.isfinite(masked))) == sorted(tok.eos_token_ids)


def test_states_are_independent_and_roll_back(tok):
    grammar = compile_grammar(parse_response_format({"type": "regex", "value": "yes|no"}, "grammar"), tok)
    first, second = grammar.start(), grammar.start()
    zeros = np.zeros(tok.vocab_size, dtype=np.float32)
    opening = np.isfinite(first(np.zeros(0), zeros.copy()))
    for char in "yes":
        first.advance(char_id(tok, char))
    assert first.done and not second.done
    assert (np.isfinite(second(np.zeros(0), zeros.copy())) == opening).all()
    first.rollback(3)
    assert not first.accepting
    assert (np.isfinite(first(np.zeros(0), zeros.copy())) == opening).all()
    # A second start of the same spec reuses the compiled grammar, from its beginning.
    third = compile_grammar(parse_response_format({"type": "regex", "value": "yes|no"}, "grammar"), tok).start()
    assert (np.isfinite(third(np.zeros(0), zeros.copy())) == opening).all()


def test_token_outside_grammar_is_refused():
    tok = Tokenizer(build_tokenizer(), bos_token_id=None, eos_token_ids=[0])
    state = compile_grammar(parse_response_format({"type": "regex", "value": "yes"}, "grammar"), tok).start()
    with pytest.raises(GrammarError, match="^grammar: "):
        state.advance(tok.token_to_id("n"))


def test_processor_writes_in_place_only_on_writable_float32():
    tok = Tokenizer(build_tokenizer(), bos_token_id=None, eos_token_ids=[0])
    state = compile_grammar(parse_response_format({"type": "json_object"}), tok).start()
    row = np.zeros(tok.vocab_size, dtype=np.float32)
    assert state(np.zeros(0), row) is row and np.isneginf(row).any()
    for other in (np.zeros(tok.vocab_size, dtype=np.float64), np.zeros(tok.vocab_size, dtype=np.float32)):
        other.flags.writeable = other.dtype == np.float64
        out = state(np.zeros(0), other)
        assert out is not other and out.dtype == np.float32 and not np.isneginf(other).any()
        assert (np.isneginf(out) == np.isneginf(row)).all()


def test_eos_ids_given_by_caller():
    tok = Tokenizer(build_tokenizer(), bos_token_id=None, eos_token_ids=[0])
    im_end = tok.token_to_id("<|im_end|>")
    state = compile_grammar(parse_response_format({"type": "regex", "value": "a"}, "g"), tok,
                            eos_token_ids=[im_end]).start()
    state.advance(tok.token_to_id("a"))
    masked = state(np.zeros(0), np.zeros(tok.vocab_size, dtype=np.float32))
    assert np.flatnonzero(np.isfinite(masked)).tolist() == [im_end]


# ---- request shapes and errors ------------------------------------------------------------


def test_shapes():
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    spec = parse_response_format(json_schema({"type": "object", "properties": {"b": {}, "a": {}}}))
    assert spec.kind == "json_schema" and list(json.loads(spec.source)["properties"]) == ["b", "a"]
    assert parse_response_format({"type": "json_object"}).kind == "json_schema"
    assert parse_response_format({"type": "lark", "value": "start: \"x\""}, "grammar").kind == "lark"
    assert parse_response_format({"type": "regex", "value": "x"}) == parse_response_format(
        {"type": "regex", "value": "x"}, "grammar")


S = "response_format.json_schema.schema"


def _nested(depth: int) -> dict:
    """A schema whose JSON nests `depth` objects deep."""
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


# Refused on arrival: what the thread that receives a request can check at the cost of reading it.
ON_ARRIVAL = [
    ([1], "response_format", "response_format must be a JSON object, got list"),
    ({"type": "xml"}, "response_format", "response_format.type must be one of"),
    ({"type": "text", "schema": {}}, "response_format", "response_format.schema is not a known field"),
    ({"type": "json_schema"}, "response_format", "response_format.json_schema must be a JSON object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format", f"{S} is required"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "response_format",
     "response_format.json_schema.strict must be true or false"),
    (json_schema([]), "response_format", f"{S} must be a JSON object, got list"),
    ({"type": "lark", "value": ""}, "grammar", "grammar.value must be a non-empty string"),
    # llguidance read 128 levels at most, and failed with a ValueError: the service answered 500.
    (json_schema(_nested(300)), "response_format", f"{S} is nested deeper than 64 levels, the limit"),
    (json_schema(_nested(65)), "response_format", f"{S} is nested deeper than 64 levels, the limit"),
    # A lone surrogate (JSON's "\ud800") failed inside llguidance.
    (json_schema({"enum": ["\ud800"]}), "response_format", f"{S} holds a lone surrogate"),
    ({"type": "regex", "value": "a\udfffb"}, "grammar", "grammar.value holds a lone surrogate"),
    (json_schema({"enum": [{1, 2}]}), "response_format", f"{S} is not JSON"),
]
# Found when it compiles, off the threads that receive and decode requests.
WHEN_COMPILED = [
    (json_schema({"type": "strin"}), "response_format", f"{S}.type: Invalid type: strin"),
    (json_schema({"type": "object", "properties": {"x": {"type": "strin"}}}), "response_format",
     f"{S}.properties.x.type: Invalid type: strin"),
    (json_schema({"type": "object", "properties": {"x": {"type": "array", "items": {
        "properties": {"c": {"type": "integer", "minimum": "a"}}}}}}), "response_format",
     f"{S}.properties.x.items.properties.c.minimum: Expected f64"),
    (json_schema({"properties": {"x": {"$ref": "#/$defs/y"}}, "$defs": {"y": {"enum": 5}}}),
     "response_format", f"{S}.$defs.y.enum: enum must be an array"),
    (json_schema({"properties": {"x": {"$ref": "#/$defs/nope"}}}), "response_format",
     f"{S}.properties.x.$ref: Pointer '/$defs/nope' does not exist"),
    (json_schema({"properties": {**{f"p{i}": {"type": "string"} for i in range(40)},
                                 "p27": {"properties": {"q": {"type": "nope"}}}}}),
     "response_format", f"{S}.properties.p27.properties.q.type: Invalid type: nope"),
    (json_schema({"anyOf": [{"type": "string"}, {"type": "nope"}]}), "response_format",
     f"{S}.anyOf[1].type: Invalid type: nope"),
    (json_schema({"properties": {"a b": {"type": "string", "pattern": "(("}}}), "response_format",
     f'{S}.properties["a b"].pattern: regex parse error'),
    (json_schema({"type": "object", "properties": {"x": {"type": "array", "minItems": 5, "maxItems": 2}}, "required": ["x"]}),
     "response_format", f"{S}.properties.x: Unsatisfiable schema: minItems (5) is greater than maxItems (2)"),
    ({"type": "regex", "value": "a(b"}, "grammar", "grammar.value: at 1(8): invalid regex"),
    ({"type": "lark", "value": 'start: foo\nfoo: "a" | bar'}, "grammar", 'grammar.value: at 2(6): unknown name: "bar"'),
    # A number JSON reads but llguidance does not: it raised a ValueError, answered 500.
    (json_schema({"type": "integer", "maximum": 10**400}), "response_format", f"{S}: "),
]


@pytest.mark.parametrize("arrival,value,where,message", [(True, *case) for case in ON_ARRIVAL]
                         + [(False, *case) for case in WHEN_COMPILED])
def test_errors_name_the_path(arrival, value, where, message):
    tok = Tokenizer(build_tokenizer(), bos_token_id=None, eos_token_ids=[0])
    with pytest.raises(GrammarError) as info:
        spec = parse_response_format(value, where)
        assert not arrival, f"not refused on arrival: {spec}"
        compile_grammar(spec, tok)
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, GenerationError)  # fronts answer it as bad_request
    assert "\n" not in str(info.value)


def test_a_schema_64_levels_deep_compiles():
    tok = Tokenizer(build_tokenizer(), bos_token_id=None, eos_token_ids=[0])
    compile_grammar(parse_response_format(json_schema(_nested(64))), tok)


def test_runs_without_llguidance():
    """The runtime imports without the extra; only a grammar request needs it."""
    code = (
        "import sys; sys.modules['llguidance'] = None\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from tiny import build_tokenizer\n"
        "from edgellm.grammar import compile_grammar, parse_response_format\n"
        "from edgellm.errors import GrammarError\n"
        "from edgellm.text import Tokenizer\n"
        "assert parse_response_format({'type': 'text'}) is None\n"
        "spec = parse_response_format({'type': 'json_object'})\n"
        "try:\n"
        "    compile_grammar(spec, Tokenizer(build_tokenizer(), bos_token_id=None, eos_token_ids=[0]))\n"
        "except GrammarError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'constrained decoding needs llguidance: pip install "edgellm[grammar]"'


# ---- the shipped SmolLM2's 49k vocabulary ---------------------------------------------------


def test_smollm2_vocabulary():
    from edgellm.export.gguf import open_gguf
    from edgellm.export.sources import resolve_builtin

    try:
        source = open_gguf(resolve_builtin("smollm2-135m"))
    except ExportError as exc:
        pytest.skip(str(exc))
    import tokenizers

    tok = Tokenizer(tokenizers.Tokenizer.from_str(source.tokenizer_json),
                    bos_token_id=source.generation["bos_token_id"],
                    eos_token_ids=source.generation["eos_token_ids"])
    grammar = compile_grammar(parse_response_format(json_schema(SCHEMA)), tok)
    for seed in range(5):
        jsonschema.validate(json.loads(generate(grammar, tok, seed)), SCHEMA)

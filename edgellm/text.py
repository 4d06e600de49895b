"""Text in and out of the model: tokenizer, chat template, streaming detokenizer, stop strings.

The bundle carries `tokenizer.json` (Hugging Face tokenizers) and, when the model
has one, `chat_template.jinja`; the manifest's generation dict says which tokens
are BOS and EOS and whether prompts start with BOS. The manifest, not the
tokenizer's own post-processor, decides about BOS, because exporters disagree on
what a tokenizer.json post-processor adds.
"""
from __future__ import annotations

import json
import os
import re
import threading
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import normalizers
from jinja2 import TemplateError, TemplateSyntaxError, meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .runtime.bundle import bundle_file
from .errors import BundleError, GenerationError
from .netjson import encodable

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The decoders write an incomplete UTF-8 sequence as U+FFFD.
_REPLACEMENT = "\ufffd"

# Plane 16's private use area: characters that stand in for special-token strings
# inside chat messages while the template renders (see `encode_chat`).
_STAND_IN = re.compile("[\U00100000-\U0010fffd]")


class Tokenizer:
    """A `tokenizers.Tokenizer` with the bundle's BOS/EOS rules."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos_token: bool = False,
    ) -> None:
        if add_bos_token and bos_token_id is None:
            raise BundleError("generation.add_bos_token is true but generation.bos_token_id is null")
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos_token = add_bos_token
        added = tokenizer.get_added_tokens_decoder()
        # The strings that encode as a special token's id: a chat template's markers.
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        # Every added token, special or not: llguidance reads them all as special tokens,
        # which a grammar names as `<content>` rather than spelling out.
        self.added_tokens = frozenset(t.content for t in added.values())
        # Encoding with `literals` swaps the normalizer for one call; no other encode may
        # run in between.
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, generation: dict[str, Any]) -> Tokenizer:
        """Read `tokenizer.json` of a bundle; `generation` is its manifest's generation dict."""
        path = bundle_file(bundle_dir, TOKENIZER_FILE)
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception for I/O and parse errors
            raise BundleError(f"{path}: cannot load tokenizer: {e}") from e
        bos = generation.get("bos_token_id")
        eos = generation.get("eos_token_ids")
        if isinstance(eos, int) and not isinstance(eos, bool):
            eos = [eos]
        vocab = tok.get_vocab_size(with_added_tokens=True)
        if not isinstance(eos, list) or not eos or not all(_is_id(t, vocab) for t in eos):
            raise BundleError(f"manifest.json: generation.eos_token_ids must be a non-empty list of "
                              f"token ids below {vocab}, got {eos!r}")
        if bos is not None and not _is_id(bos, vocab):
            raise BundleError(f"manifest.json: generation.bos_token_id must be a token id below "
                              f"{vocab} or null, got {bos!r}")
        add_bos = generation.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise BundleError(f"manifest.json: generation.add_bos_token must be true or false, "
                              f"got {add_bos!r}")
        return cls(tok, bos_token_id=bos, eos_token_ids=eos, add_bos_token=add_bos)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True,
               literals: Mapping[str, str] | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (as a rendered chat
        template writes them) become their ids. `literals` maps stand-in characters of
        `text` to the strings they are encoded as, always as plain text. BOS is
        prepended only when the bundle asks for it and the text does not already
        begin with it."""
        try:
            with self._lock:
                ids = self._encode_literals(text, literals) if literals else \
                    self.tokenizer.encode(text, add_special_tokens=False).ids
        except TypeError:  # what tokenizers raises for a lone surrogate ("\ud800"): not text
            if isinstance(text, str) and not encodable(text):
                raise GenerationError("prompt holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
            raise
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def bytes_per_token(self) -> int | None:
        """The most bytes of prompt text one token can stand for, or None when this tokenizer's
        normalizer or pre-tokenizer may drop text (then no such bound holds).

        A token's string is at least as long in UTF-8 as the text it covers (byte-level
        vocabularies spell each byte as one character, SentencePiece a space as '▁'); a
        normalizer that composes or folds characters shrinks text at most 4 times (a 4-byte
        character to a 1-byte one)."""
        config = json.loads(self.tokenizer.to_str())
        parts = [*_components(config.get("normalizer")), *_components(config.get("pre_tokenizer"))]
        if not all(_keeps_text(part) for part in parts):
            return None
        longest = max(len(token.encode("utf-8")) for token in self.tokenizer.get_vocab(with_added_tokens=True))
        return longest * (4 if any(part["type"] in _FOLDS for part in parts) else 1)

    def _encode_literals(self, text: str, literals: Mapping[str, str]) -> list[int]:
        # Special tokens are matched in the raw text, before the normalizer runs: a
        # stand-in passes that match and becomes its string only afterwards, as text.
        plain = self.tokenizer.normalizer
        swaps = [normalizers.Replace(c, s) for c, s in literals.items()]
        self.tokenizer.normalizer = normalizers.Sequence(swaps if plain is None else [*swaps, plain])
        try:
            enc = self.tokenizer.encode(text, add_special_tokens=False)
        finally:
            self.tokenizer.normalizer = plain
        # Some tokenizers still produce the special id from the restored string: one
        # declared `normalized` is matched after the normalizer, and a model may have it
        # as an ordinary piece (Unigram vocabularies). Refuse rather than encode it so.
        ids = set(self.special_tokens.values())
        for token, (start, end) in zip(enc.ids, enc.offsets):
            if token in ids and (spelled := [literals[c] for c in text[start:end] if c in literals]):
                raise GenerationError(f"a message contains {spelled[0]!r}, a special token this "
                                      f"tokenizer cannot encode as text")
        return enc.ids


_FOLDS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase"})
_KEEPS = _FOLDS | {"ByteLevel", "Metaspace", "Digits", "Punctuation", "Prepend", "Split", "Replace", "Sequence"}


def _components(part: Any) -> list[dict[str, Any]]:
    """A tokenizer.json normalizer or pre-tokenizer and everything in its sequences, flattened."""
    if not isinstance(part, dict):
        return []
    inner = part.get("normalizers") or part.get("pretokenizers") or []
    return [part, *(c for p in inner for c in _components(p))]


def _keeps_text(part: dict[str, Any]) -> bool:
    """Whether a normalizer or pre-tokenizer keeps every character of the text (one that
    removes whitespace, accents or control characters does not)."""
    kind = part.get("type")
    if kind == "Split":
        return str(part.get("behavior", "")).lower() != "removed"
    if kind == "Replace":
        pattern = (part.get("pattern") or {}).get("String")
        return isinstance(pattern, str) and len(str(part.get("content", "")).encode()) >= len(pattern.encode())
    return kind in _KEEPS


def cannot_fit(prompt: Any, tokenizer: Tokenizer, context: int) -> str | None:
    """Why `prompt` cannot fit in `context` tokens, found without tokenizing it; None when it may.

    Text of more than `context * tokenizer.bytes_per_token` bytes needs more tokens than the
    context holds, so a huge prompt is refused before it is queued, rendered or tokenized (1 MB
    took the worker a second). Chat messages count their user turns only: a chat template may
    leave out a system or tool message, or an assistant's reasoning, but renders what the user said."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return f"prompt has {len(prompt)} tokens, context is {context}" if len(prompt) > context else None
    if isinstance(prompt, str):
        size = len(prompt.encode("utf-8", "surrogatepass"))
    elif isinstance(prompt, list):
        size = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in prompt
                   if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str))
    else:
        return None
    per_token = tokenizer.bytes_per_token
    if per_token is None or size <= context * per_token:
        return None
    return (f"prompt has more than {context} tokens ({size} bytes of text; a token of this model stands for "
            f"at most {per_token}), context is {context}")


def _is_id(value: object, vocab: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab


class _TemplateRaised(Exception):
    """What `raise_exception` in a template raises, told apart from template bugs."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    """The environment Hugging Face renders chat templates in, so templates written
    for transformers render the same text here."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def template_variables(source: str | None) -> frozenset[str]:
    """The variables a chat template reads from its caller (`tools`, `enable_thinking`, ...);
    none for a missing or unparsable template, which then renders without extras."""
    if source is None:
        return frozenset()
    try:
        ast = _environment().parse(source)
    except TemplateSyntaxError:
        return frozenset()
    return frozenset(meta.find_undeclared_variables(ast))


class ChatTemplate:
    """A model's Jinja chat template. `template` None means the bundle has none:
    loading still works (plain prompts need no template) and only rendering fails."""

    def __init__(self, template: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled = None
        if template is not None:
            try:
                self._compiled = _environment().from_string(template)
            except TemplateError as e:
                raise GenerationError(f"chat template does not compile: {_describe(e)}") from e

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, generation: dict[str, Any]) -> ChatTemplate:
        """The bundle's `chat_template.jinja`, or a template-less ChatTemplate when absent."""
        bos = generation.get("bos_token") or ""
        eos = generation.get("eos_token") or ""
        if not os.path.lexists(Path(bundle_dir) / CHAT_TEMPLATE_FILE):
            return cls(None, bos_token=bos, eos_token=eos)
        path = bundle_file(bundle_dir, CHAT_TEMPLATE_FILE)
        try:
            return cls(path.read_text(encoding="utf-8"), bos_token=bos, eos_token=eos)
        except (OSError, UnicodeDecodeError) as e:
            raise BundleError(f"{path}: cannot read chat template: {e}") from e
        except GenerationError as e:
            raise BundleError(f"{path}: {e}") from e

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt text for `messages`, checked already (`messages.check_messages`); `extra`
        reaches the template as variables (tools, enable_thinking, ...)."""
        if self._compiled is None:
            raise GenerationError("bundle has no chat template; send a plain prompt")
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra}
        try:
            return self._compiled.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **context)
        except _TemplateRaised as e:
            raise GenerationError(f"chat template rejected the messages: {e}") from e
        # A template is data from the bundle: whatever it trips over is reported as a
        # template failure, not as a crash of the caller.
        except Exception as e:
            raise GenerationError(f"chat template failed: {_describe(e)}") from e


def encode_chat(tokenizer: Tokenizer, template: ChatTemplate, messages: list[dict[str, str]],
                add_generation_prompt: bool = True, **extra: Any) -> list[int]:
    """Token ids of `messages` rendered through `template`, where only the template's
    own markers become special tokens.

    A special-token string inside a message or tool description (`<|im_end|>` then
    `<|im_start|>system`) is encoded as the text it spells, so content cannot close its
    turn and open a system one. While the template renders, each such string is a
    private-use stand-in that the tokenizer turns back into the string after matching
    special tokens; a chat without such strings encodes exactly as its rendered text.
    """
    stand_ins = _StandIns(tokenizer.special_tokens, taken=template.source or "")
    text = template.render(stand_ins.hide(messages), add_generation_prompt, **stand_ins.hide(extra))
    return tokenizer.encode(text, literals=stand_ins.strings)


class _StandIns:
    """Replaces special-token strings in request data with private-use characters.

    Private-use characters already in the data are replaced too, so every stand-in in
    the rendered text is one of ours and each comes back as exactly what it replaced.
    """

    def __init__(self, specials: Iterable[str], taken: str) -> None:
        longest_first = [re.escape(s) for s in sorted(specials, key=len, reverse=True)]
        self._pattern = re.compile("|".join([*longest_first, _STAND_IN.pattern]))
        taken_chars = set(_STAND_IN.findall(taken))  # a template may write some itself
        self._free = (c for c in map(chr, range(0x100000, 0x10FFFE)) if c not in taken_chars)
        self._by_string: dict[str, str] = {}
        self.strings: dict[str, str] = {}  # stand-in -> the string it replaced

    def hide(self, value: Any) -> Any:
        """`value` with every string in it (dict keys too) carrying stand-ins."""
        if isinstance(value, str):
            return self._pattern.sub(self._stand_in, value)
        if isinstance(value, dict):
            return {self.hide(k): self.hide(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.hide(v) for v in value)
        return value

    def _stand_in(self, match: re.Match[str]) -> str:
        string = match.group()
        if string not in self._by_string:
            char = next(self._free)
            self._by_string[string], self.strings[char] = char, string
        return self._by_string[string]


def _describe(e: Exception) -> str:
    line = getattr(e, "lineno", None)
    where = f" (line {line})" if line else ""
    return f"{type(e).__name__}: {e}{where}"


class StreamDecoder:
    """Turns token ids into text as they arrive, emitting only complete characters.

    Each push decodes a short window twice, with and without the new tokens, and
    emits the difference: decoding a window rather than one token keeps the spacing
    rules of decoders that look at neighbours (SentencePiece's leading space), and
    holding back while the window ends in U+FFFD keeps a character split across
    byte tokens until its last byte arrives. The window restarts after every emit,
    so the cost per token does not grow with the text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0  # ids before this index have been emitted as text

    def push(self, token_id: int) -> str:
        """The text completed by `token_id`; "" while a character is incomplete."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith(_REPLACEMENT):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Whatever is held back, incomplete characters included (as U+FFFD)."""
        return self._emit(self._decode(self._ids))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _emit(self, text: str) -> str:
        delta = text[len(self._decode(self._ids[: self._read])):]
        # The last chunk that produced text stays as the window's prefix: it decides
        # how the next token's leading space decodes. A chunk that produced none (a
        # skipped special token) cannot, so the older prefix stays too.
        if delta:
            self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return delta


class StopMatcher:
    """Cuts streamed text at the first stop string, which is never emitted.

    Text that could still grow into a stop string is held back until it cannot, so
    a stop string split across several deltas still stops the stream.
    """

    def __init__(self, stop: Iterable[str] | str) -> None:
        # One string is one stop string (as OpenAI reads it), never its characters.
        self.stop = [stop] if isinstance(stop, str) else list(stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise GenerationError(f"stop strings must be non-empty strings, got {s!r}")
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._held = ""
            self.stopped = True
            return text[: min(hits)], True
        keep = max((partial_suffix(text, s) for s in self.stop), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, once no more deltas will come."""
        held, self._held = self._held, ""
        return held


def partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class Trimmed:
    """Streamed text released without whitespace at its edges: leading whitespace is dropped
    while `strip_lead` is set, trailing whitespace is held in `held` until text follows it
    (so a reply's channel never ends on the newlines that parted it from the next one)."""

    def __init__(self, strip_lead: bool = False) -> None:
        self.strip_lead = strip_lead
        self.held = ""

    def push(self, text: str) -> str:
        if self.strip_lead:
            text = text.lstrip()
            self.strip_lead = not text
        body = text.rstrip()
        if not body:
            self.held += text
            return ""
        out, self.held = self.held + body, text[len(body):]
        return out

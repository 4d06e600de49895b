"""Reasoning traces: the `<think>…</think>` block a reasoning model writes before its answer.

Qwen3 and the DeepSeek-R1 distills open their reply with such a block. A voice assistant
must not read it aloud and an auditor wants to keep it, so it is split from the answer
as it streams and goes out on its own channel. Only a block that opens the reply counts:
once answer text has started, a later marker is just text, and a grammar on the answer
knows where it begins.

Modes (`MODES`): "separate" gives (reasoning, text) apart; "hide" drops the reasoning;
"inline" leaves the text as generated (markers included where the tokenizer spells them);
"off" renders the template with `enable_thinking=False` where it reads that variable, never
lets a block open and closes at once one the prompt opened, so a TTS never speaks one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np

from .errors import BundleError
from .sampling import Processor
from .text import StreamDecoder, Tokenizer, Trimmed, template_variables

Mode = Literal["separate", "hide", "inline", "off"]
MODES: tuple[Mode, ...] = ("separate", "hide", "inline", "off")
DEFAULT_MARKERS = ("<think>", "</think>")
CONFIG_KEY = "reasoning_markers"  # in the manifest's generation dict


@dataclass(frozen=True)
class Markers:
    """A model's think markers, each one token of its vocabulary, so the end can be forced."""

    start: str
    end: str
    start_id: int
    end_id: int

    def opened_by(self, prompt: str) -> bool:
        """Whether the rendered prompt ends inside a block (a DeepSeek-R1 distill's generation
        prompt writes `<think>\\n`), so the reply starts with reasoning and no start marker."""
        return prompt.rstrip().endswith(self.start)


def detect_markers(template: str | None, token_to_id: Callable[[str], int | None],
                   configured: object = None) -> Markers | None:
    """The model's think markers: `configured` (the manifest's `reasoning_markers`, a
    [start, end] pair) when given, else `<think>`/`</think>` where the chat template
    mentions the end marker and the vocabulary has both as tokens; None for a model
    that does not reason."""
    if configured is not None:
        where = f"manifest.json: generation.{CONFIG_KEY}"
        if (not isinstance(configured, list) or len(configured) != 2
                or not all(isinstance(s, str) and s for s in configured)):
            raise BundleError(f"{where} must be a [start, end] pair of strings, got {configured!r}")
        ids = [token_to_id(s) for s in configured]
        if None in ids:
            raise BundleError(f"{where}: {configured[ids.index(None)]!r} is not one token of "
                              f"the vocabulary")
        return Markers(configured[0], configured[1], ids[0], ids[1])  # type: ignore[arg-type]
    start, end = DEFAULT_MARKERS
    start_id, end_id = token_to_id(start), token_to_id(end)
    if template is None or end not in template or start_id is None or end_id is None:
        return None
    return Markers(start, end, start_id, end_id)


def template_extras(mode: Mode, template: str | None) -> dict[str, Any]:
    """Variables to render the chat template with for `mode`."""
    if mode == "off" and "enable_thinking" in template_variables(template):
        return {"enable_thinking": False}
    return {}


class Reasoning:
    """One reply's progress through its think block, token by token, and the block's text.

    The markers are single tokens, so the phase follows token ids: text that merely spells
    a marker never switches it, whether or not the tokenizer calls the marker special.
    Phases: "start" (the reply may still open a block), "inside", "answer". A grammar holds
    only the answer (`constrain`); `forced` closes the block once `max_tokens` are spent.
    Whitespace that only parts the block from the answer goes to neither channel.
    """

    def __init__(self, markers: Markers, mode: Mode, tokenizer: Tokenizer, *, inside: bool = False,
                 max_tokens: int | None = None) -> None:
        self.markers = markers
        self.mode = mode
        self.phase = "inside" if inside else "start"
        self.spent = 0  # tokens inside the block, markers not counted
        # "off": a block the prompt opened is closed at once, and none may open.
        self.budget = 0 if mode == "off" else max_tokens
        self._decoder = StreamDecoder(tokenizer)
        # The reasoning channel without its edge whitespace (what trails it is dropped at the end marker).
        self._thought = Trimmed(strip_lead=True)
        self._strip_answer = False  # the block just ended: strip the answer's leading whitespace

    @property
    def answering(self) -> bool:
        """The reply is past its reasoning (or has none): a grammar holds from here."""
        return self.phase == "answer"

    def forced(self) -> int | None:
        """The token to emit instead of sampling: the end marker once the budget is spent."""
        if self.phase == "inside" and self.budget is not None and self.spent >= self.budget:
            return self.markers.end_id
        return None

    def constrain(self, tokens: np.ndarray, logits: np.ndarray, grammar: Processor | None) -> np.ndarray:
        """`logits` as this phase allows: free inside the block; the grammar on the answer;
        at the start the grammar's choices plus the start marker. In "off" no marker is
        ever sampled outside a block."""
        if self.phase == "inside":
            return logits
        start = self.markers.start_id
        opener = float(logits[start]) if self.phase == "start" and self.mode != "off" else None
        if grammar is not None:
            logits = grammar(tokens, logits)
        if opener is None and self.mode != "off":
            return logits
        if logits.dtype != np.float32 or not logits.flags.writeable:
            logits = logits.astype(np.float32)
        if self.mode == "off":
            logits[[start, self.markers.end_id]] = -np.inf
        else:
            logits[start] = opener
        return logits

    def push(self, token: int) -> str | None:
        """The reasoning delta `token` makes ("" while held back or hidden); None when the
        token is answer text. In "inline" mode everything is answer text."""
        if self.phase == "start":
            if token != self.markers.start_id:
                self.phase = "answer"
                return None
            self.phase = "inside"
            return None if self.mode == "inline" else ""
        if self.phase == "answer":
            return None
        if token == self.markers.end_id:
            self.phase, self._strip_answer = "answer", self.mode != "inline"
            rest = self.flush()
            self._thought.held = ""
            return None if self.mode == "inline" else rest
        self.spent += 1
        if self.mode == "inline":
            return None
        return self._thought.push(self._decoder.push(token)) if self.mode == "separate" else ""

    def answer_text(self, text: str) -> str:
        """Answer text with the whitespace that follows a closed block removed."""
        if self._strip_answer:
            text = text.lstrip()
            self._strip_answer = not text
        return text

    def flush(self) -> str:
        """Reasoning text still held back; a block never closed is all reasoning."""
        return self._thought.push(self._decoder.flush()) if self.mode == "separate" else ""

"""Reasoning traces: the `<think>…</think>` block a reasoning model writes before its answer.

Qwen3 and the DeepSeek-R1 distills open their reply with such a block. A voice assistant
must not read it aloud and an auditor wants to keep it, so it is split from the answer
as it streams and goes out on its own channel. Only a block that opens the reply counts:
once answer text has started, a later marker is just text, and a grammar on the answer
knows where it begins.

Modes (`MODES`): "separate" gives (reasoning, text) apart; "hide" drops the reasoning;
"inline" leaves the text as generated, markers included; "off" renders the template with
`enable_thinking=False` where it reads that variable and drops any block the model still
writes, so a TTS never speaks one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from .errors import BundleError
from .text import partial_suffix, template_variables

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

    def force_end(self, spent: int, max_reasoning_tokens: int | None) -> list[int]:
        """The tokens to force now that `spent` tokens went into reasoning: the end marker
        once the budget is used up, else none."""
        if max_reasoning_tokens is not None and spent >= max_reasoning_tokens:
            return [self.end_id]
        return []

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


class ReasoningSplitter:
    """Splits streamed reply text into (reasoning, text) deltas by `mode`.

    A marker split across deltas (`<thi` + `nk>`) is held back until it is whole or
    cannot become one. Whitespace that only separates the block from the answer (the
    newline after `<think>`, the blank line after `</think>`) goes to neither channel.
    """

    def __init__(self, markers: Markers, mode: Mode = "separate", *, inside: bool = False) -> None:
        self._markers = markers
        self._mode = mode
        # "start": the reply may still open a block; "inside" it; "answer": the block is over.
        self._state = "inside" if inside else "start"
        self._buf = ""
        self._ws = ""  # trailing whitespace of released reasoning, dropped if the block ends
        self._strip = inside  # strip the next channel's leading whitespace
        self._prefix = markers.start if inside and mode == "inline" else ""

    @property
    def in_reasoning(self) -> bool:
        return self._state == "inside"

    @property
    def answering(self) -> bool:
        """True once the reply is past its reasoning (or has none): a grammar applies from here."""
        return self._state == "answer"

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        return self._out(delta, *self._drain(final=False))

    def flush(self) -> tuple[str, str]:
        """What is held back, once the reply is over; a block never closed is all reasoning."""
        return self._out("", *self._drain(final=True))

    def _out(self, raw: str, reasoning: str, text: str) -> tuple[str, str]:
        if self._mode == "inline":
            raw, self._prefix = self._prefix + raw, ""
            return "", raw
        if self._mode == "separate":
            return reasoning, text
        return "", text

    def _drain(self, final: bool) -> tuple[str, str]:
        start, end = self._markers.start, self._markers.end
        reasoning = ""
        if self._state == "start":
            head = self._buf.lstrip()
            if not final and (not head or start.startswith(head)):
                return "", ""
            if head.startswith(start):
                self._state, self._buf, self._strip = "inside", head[len(start):], True
            else:
                self._state = "answer"
        if self._state == "inside":
            if self._strip:
                self._buf = self._buf.lstrip()
                self._strip = not self._buf
            at = self._buf.find(end)
            if at >= 0:
                reasoning = self._reasoning(self._buf[:at])
                self._state, self._buf = "answer", self._buf[at + len(end):]
                self._ws, self._strip = "", True
            else:
                keep = 0 if final else partial_suffix(self._buf, end)
                reasoning = self._reasoning(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return reasoning, ""
        text, self._buf = self._buf, ""
        if self._strip:
            text = text.lstrip()
            self._strip = not text
        return reasoning, text

    def _reasoning(self, text: str) -> str:
        body = text.rstrip()
        if not body:
            self._ws += text
            return ""
        out, self._ws = self._ws + body, text[len(body):]
        return out


def split_reasoning(text: str, markers: Markers, *, inside: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply; the same splitter the stream uses."""
    splitter = ReasoningSplitter(markers, "separate", inside=inside)
    r1, t1 = splitter.feed(text)
    r2, t2 = splitter.flush()
    return r1 + r2, t1 + t2

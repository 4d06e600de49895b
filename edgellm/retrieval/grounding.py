"""Retrieved chunks into a chat as numbered sources, and the answer's citations as data.

The sources go into the system turn (after the caller's own system prompt, if any), each as
`[n] file, heading` and its text, with the instruction to answer from them and cite `[n]`; the
chat template renders them like any system prompt. What comes back beside the answer is every
source with where it lives (file, heading, line, span) and whether the answer cited it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from .index import Hit

INSTRUCTION = ("Answer from the numbered sources below. Cite each source you use as [n]. If the sources do not "
               "hold the answer, say so.")
_CITE = re.compile(r"\[(\d{1,3})\]")


@dataclass(frozen=True)
class Citation:
    """A source given to the model: its number in the prompt, where it lives, and whether the answer cites it."""

    n: int
    path: str
    heading: str
    line: int
    start: int
    end: int
    score: float
    cited: bool = False
    chunk: int = 0  # the chunk's row id in its index

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "chunk": self.chunk, "path": self.path, "heading": self.heading, "line": self.line,
                "start": self.start, "end": self.end, "score": round(self.score, 6), "cited": self.cited}


def ground(messages: Sequence[dict[str, Any]], hits: Sequence[Hit]) -> tuple[list[dict[str, Any]], list[Citation]]:
    """`messages` with the hits as numbered sources in the system turn, and the sources as citations."""
    citations = [Citation(n, h.path, h.heading, h.line, h.start, h.end, h.score, chunk=h.chunk)
                 for n, h in enumerate(hits, 1)]
    if not hits:
        return list(messages), []
    listing = "\n\n".join(f"[{c.n}] {Path(c.path).name}" + (f", {c.heading}" if c.heading else "") + f"\n{h.text}"
                          for c, h in zip(citations, hits))
    sources = f"{INSTRUCTION}\n\n{listing}"
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = f"{out[0]['content']}\n\n{sources}"
    else:
        out.insert(0, {"role": "system", "content": sources})
    return out, citations


def mark_cited(answer: str, citations: Sequence[Citation]) -> list[Citation]:
    """The citations with `cited` set for each source the answer names as [n]."""
    named = {int(n) for n in _CITE.findall(answer)}
    return [replace(c, cited=c.n in named) for c in citations]


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    """The question to search for: the last user turn's text."""
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""

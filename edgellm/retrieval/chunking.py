"""Documents -> chunks by their structure: Markdown headings, then paragraphs, then sentences.

A chunk keeps where it came from (its heading path, first line, character span) so an answer can
cite "manual.md, Pumps > Cavitation, line 42". Paragraphs of one section are packed together up to
MAX_CHARS (about 200 tokens: all-MiniLM-L6-v2 reads 256); a chunk never spans two sections, so
a search hit names one heading. PDF text (pypdf, the `retrieval` extra) is chunked page by page.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from ..errors import RetrievalError

MAX_CHARS = 800
TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".text", ".rst")
SUFFIXES = (*TEXT_SUFFIXES, ".pdf")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    text: str
    heading: str  # "Pumps > Cavitation" (Markdown), "page 3" (PDF), "" (plain text)
    line: int  # first line, 1-based (PDF: the page)
    start: int  # character span in the document's text, line ends as \n (PDF: in its page's text)
    end: int

    def embedded_text(self) -> str:
        """What is embedded: the heading path names the topic a bare paragraph often leaves out."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def read_chunks(path: Path, data: bytes | None = None) -> list[Chunk]:
    """The chunks of one document, by its suffix; `data`: its bytes, when read already."""
    data = path.read_bytes() if data is None else data
    if path.suffix.lower() == ".pdf":
        return [replace(c, line=page) for page, text in enumerate(_pdf_pages(path, data), 1)
                for c in _sections(text, f"page {page}", page)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RetrievalError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return list(chunk_text(text.replace("\r\n", "\n"), path.suffix.lower() in (".md", ".markdown")))


def chunk_text(text: str, markdown: bool = True) -> Iterator[Chunk]:
    """Chunks of `text`; with `markdown`, sections start at ATX headings (outside code fences)."""
    if not markdown:
        yield from _sections(text, "", 1)
        return
    path: list[str] = []
    start, line, fenced = 0, 1, False
    offset = 0
    for number, raw in enumerate(text.splitlines(keepends=True), 1):
        if raw.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        match = None if fenced else _HEADING.match(raw.rstrip("\n"))
        if match:
            yield from _sections(text[start:offset], " > ".join(path), line, start)
            path = path[: len(match.group(1)) - 1] + [match.group(2)]
            start, line = offset + len(raw), number + 1
        offset += len(raw)
    yield from _sections(text[start:], " > ".join(path), line, start)


def _sections(text: str, heading: str, line: int, base: int = 0) -> Iterator[Chunk]:
    """One section's paragraphs packed into chunks of at most MAX_CHARS (a longer paragraph is
    cut at sentence ends, a longer sentence at MAX_CHARS)."""
    pieces: list[tuple[int, int]] = []  # spans of paragraphs (or their parts) in `text`
    for match in re.finditer(r"\S(?:.|\n(?![ \t]*\n))*", text):
        pieces.extend(_fit(text, match.start(), match.start() + len(match.group().rstrip())))
    group: list[tuple[int, int]] = []
    for span in pieces:
        if group and span[1] - group[0][0] > MAX_CHARS:
            yield _chunk(text, group, heading, line, base)
            group = []
        group.append(span)
    if group:
        yield _chunk(text, group, heading, line, base)


def _fit(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    if end - start <= MAX_CHARS:
        yield start, end
        return
    cut = start
    for match in _SENTENCE_END.finditer(text, start, end):
        if match.start() - cut > MAX_CHARS:
            yield from _hard(cut, match.start())
            cut = match.end()
        elif match.end() - cut > MAX_CHARS * 3 // 4:
            yield cut, match.start()
            cut = match.end()
    yield from _hard(cut, end)


def _hard(start: int, end: int) -> Iterator[tuple[int, int]]:
    for cut in range(start, end, MAX_CHARS):
        yield cut, min(cut + MAX_CHARS, end)


def _chunk(text: str, group: list[tuple[int, int]], heading: str, line: int, base: int) -> Chunk:
    start, end = group[0][0], group[-1][1]
    return Chunk(text="\n\n".join(text[a:b] for a, b in group), heading=heading,
                 line=line + text.count("\n", 0, start), start=base + start, end=base + end)


def _pdf_pages(path: Path, data: bytes) -> list[str]:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise RetrievalError(f"{path}: reading PDF needs pypdf: pip install 'edgellm[retrieval]'") from None
    try:
        return [page.extract_text() or "" for page in PdfReader(io.BytesIO(data)).pages]
    except (PyPdfError, ValueError, OSError) as exc:
        raise RetrievalError(f"{path}: not a readable PDF ({exc})") from None

"""The plant's manual in the anomaly recipe: the indexed sections nearest a group, in its prompt
under short ids, and the sections its explanation cites as structured citations.

The query is written from the computed facts, not from the model: the machine, the sensor and
which way it left its band ("pump-2 temperature too high, rising above its normal band"). Numbers
are left out: an embedding model matches a manual's words, and a band's figures pull in whatever
section lists the bands. The index is the one `edgellm index add` builds and keeps (docs/retrieval.md);
a document re-indexed while the recipe runs is searched in its new state at the next group.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import BundleError, RetrievalError
from ..retrieval.index import Hit, Index, open_encoder, retrieve
from .events import Group
from .facts import Facts

ID_PREFIX = "M"  # section ids "M1", "M2", ...: a manual section, numbered in the prompt's order


@dataclass(frozen=True)
class RetrievalSettings:
    """The `[anomaly.retrieval]` table: which index, which embedding bundle (default: the one the
    index was built with), and how many sections go into each prompt."""

    index: Path
    embedding: Path | None = None
    k: int = 3


MAX_K = 8  # sections in one prompt: each is up to 800 characters, about 200 tokens


@dataclass(frozen=True)
class Section:
    id: str
    hit: Hit

    def prompt_text(self) -> str:
        """What the prompt shows after the id: the section's own heading and its first paragraph
        on one line. Not the file name or heading path (SmolLM2-135M copied "line A maintenance
        manual" into its summaries), nor the whole text (it retold it up to the 200-character
        limit); the citation points the technician to all of it."""
        heading = self.hit.heading.rsplit(" > ", 1)[-1]
        return (f"{heading}: " if heading else "") + " ".join(self.hit.text.split("\n\n", 1)[0].split())

    def citation(self) -> dict[str, Any]:
        """Where the section lives; its last line counted from the chunk's text (paragraphs it
        joins are one blank line apart in it)."""
        hit = self.hit
        return {"id": self.id, "path": hit.path, "heading": hit.heading,
                "lines": [hit.line, hit.line + hit.text.count("\n")], "score": round(hit.score, 4)}


class Manual:
    """An open index and its embedding model, for one recipe. The encoder is loaded and checked
    against the index when the settings load; each thread opens its own connection to the index
    file (SQLite connections stay on the thread that made them)."""

    def __init__(self, settings: RetrievalSettings, where: str) -> None:
        self.settings = settings
        if not settings.index.is_file():
            raise RetrievalError(f"{where}.index {settings.index}: no such index (build it with edgellm index add)")
        with Index(settings.index) as index:
            if not index.documents():
                raise RetrievalError(f"{where}.index {settings.index}: the index holds no documents")
            try:
                self.encoder = open_encoder(index, settings.embedding, flag=f"{where}.embedding")
            except BundleError as exc:  # the bundle named, or the one the index remembers, is not there
                raise RetrievalError(f"{where}.embedding: {exc}") from None
        self._local = threading.local()

    def sections(self, group: Group, found: Facts) -> list[Section]:
        """The `k` sections nearest `group`'s query, best first, as "M1", "M2", ..."""
        index = getattr(self._local, "index", None)
        if index is None:
            index = self._local.index = Index(self.settings.index)
        hits = retrieve(index, self.encoder, query(group, found), self.settings.k)
        return [Section(f"{ID_PREFIX}{n}", hit) for n, hit in enumerate(hits, 1)]


def query(group: Group, found: Facts) -> str:
    """What to search the manual for: the machine, the sensor and which way it left its band."""
    limit = found.band.high if found.band is not None else group.last.baseline
    where = f"{group.first.machine} {group.first.sensor}"
    if found.worst > limit:
        return f"{where} too high, rising above its normal band"
    return f"{where} too low, dropping below its normal band" + (" to zero" if found.worst == 0 else "")


def cited(sections: Sequence[Section], evidence: Sequence[Any]) -> list[dict[str, Any]]:
    """The citations of the sections `evidence` names, in the order it names them."""
    by_id = {section.id: section for section in sections}
    return [by_id[item].citation() for item in dict.fromkeys(evidence) if item in by_id]

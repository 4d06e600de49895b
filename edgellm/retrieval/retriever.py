"""A request's `retrieval`: the named indexes a model answers from, and the model that embeds the question.

`edgellm serve --index NAME=FILE --embedding BUNDLE` (and `edgellm run --index FILE`) give a
`Model` its `Retriever`; a request naming one of its indexes is checked against it where it
arrives (`names`), grounded before its prompt is rendered (`ground`: the chunks nearest the
last user message, as numbered sources through `grounding.ground`), and its final `Result`
carries the sources as citations, each marked cited or not (`Sequence.finish`).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import GenerationError, RetrievalError
from .grounding import Citation, ground, last_user_text, mark_cited
from .index import Index

if TYPE_CHECKING:
    from ..params import Retrieval
    from .embed import Embedder

_FIELD = "retrieval"


class Retriever:
    """Indexes by name and the embedding model they were built with (checked here, once:
    RetrievalError names the file that is missing or was built by another model).

    Each thread that grounds requests opens its own connection to each index (an sqlite3
    connection belongs to the thread that made it), once, and keeps it with its vectors."""

    def __init__(self, indexes: Mapping[str, str | Path], embedder: "Embedder") -> None:
        self.paths = {name: Path(path) for name, path in indexes.items()}
        self.embedder = embedder
        for name, path in self.paths.items():
            if not path.is_file():
                raise RetrievalError(f"index {name}={path}: no such index (create it with edgellm index add)")
            with Index(path) as index:
                index.check_model(embedder.model)
        self._local = threading.local()

    @property
    def names(self) -> list[str]:
        return sorted(self.paths)

    def check(self, retrieval: "Retrieval") -> None:
        """Refuse an index this model does not serve (GenerationError naming the field)."""
        if retrieval.index not in self.paths:
            raise GenerationError(f"retrieval.index {retrieval.index!r} is not an index this model serves "
                                  f"(served: {', '.join(self.names) or 'none'})", field=_FIELD)

    def ground(self, prompt: Any, retrieval: "Retrieval") -> tuple[list[dict[str, Any]], list[Citation]]:
        """`prompt` (chat messages) with the `retrieval.k` chunks nearest its last user message as
        numbered sources in the system turn, and those sources."""
        if not (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt)):
            raise GenerationError("retrieval needs chat messages: the sources go into the chat's system turn",
                                  field=_FIELD)
        query = last_user_text(prompt)
        if not query.strip():
            raise GenerationError("retrieval searches for the last user message, and this chat has none",
                                  field=_FIELD)
        vector = self.embedder.vector(query)
        return ground(prompt, self._index(retrieval.index).search(vector, retrieval.k))

    def _index(self, name: str) -> Index:
        opened: dict[str, Index] = self._local.__dict__.setdefault("indexes", {})
        if name not in opened:
            opened[name] = Index(self.paths[name])
        return opened[name]


def citations(answer: str, sources: Sequence[Citation]) -> list[dict[str, Any]]:
    """The sources as a final result carries them: each as data, marked cited where `answer` names it."""
    return [c.to_dict() for c in mark_cited(answer, sources)]

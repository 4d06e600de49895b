"""The local document index: chunks, their sources and vectors in one SQLite file.

One file (WAL journal) holds everything, so an index is copied or backed up as one thing. Each
document is chunked and embedded first, then replaces its old rows in one transaction: a crash or
kill while indexing leaves the index as it was before that document. A document whose sha256 is
unchanged is skipped, a changed one re-indexed, a deleted one (under a folder being added) removed.

Vectors are float32 blobs in a plain table; search multiplies them, held in memory, by the query
(numpy), reloaded only when the file changed. Measured against sqlite-vec's vec0 (benchmarks/
retrieval.py): exact either way, and the matrix product was faster at 10k and 100k chunks.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from ..errors import RetrievalError
from .chunking import SUFFIXES, Chunk, read_chunks

SCHEMA_VERSION = 1
MAX_K = 100
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, document INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL, heading TEXT NOT NULL, line INTEGER NOT NULL, start INTEGER NOT NULL,
    "end" INTEGER NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document);
"""


class Encoder(Protocol):
    """What the index needs of an embedding model (retrieval.embed.EmbeddingModel)."""

    name: str
    dimensions: int

    def embed(self, texts: str | Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Hit:
    """One search result: the chunk, where it comes from, and its cosine similarity to the query."""

    score: float
    path: str
    heading: str
    line: int
    start: int
    end: int
    text: str
    chunk: int  # the chunk's row id

    def to_dict(self) -> dict[str, object]:
        return {"score": round(self.score, 6), "path": self.path, "heading": self.heading, "line": self.line,
                "start": self.start, "end": self.end, "text": self.text, "chunk": self.chunk}


@dataclass(frozen=True)
class Change:
    """What `add` did to one document: "added", "updated", "unchanged", "removed", or "failed"
    (unreadable: `error` says why; the index keeps what it had for it, and the others go on)."""

    path: str
    action: str
    chunks: int = 0
    error: str = ""


def model_id(model: Encoder) -> str:
    """An embedding model's identity (name, dimensions, graph checksum) as the index stores it:
    vectors of two models are not comparable."""
    manifest = getattr(model, "manifest", None)
    files = getattr(manifest, "files", None) or {}
    graph_file = getattr(getattr(manifest, "graph", None), "file", "")
    return json.dumps({"name": model.name, "dimensions": model.dimensions,
                       "graph_sha256": files.get(graph_file, "")})


class Index:
    """An open index file. Not shared between threads; open one per thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise RetrievalError(f"{self.path}: not an edgellm index ({exc})") from None
        version = self.meta("schema")
        if version is None:
            self._set_meta("schema", str(SCHEMA_VERSION))
        elif version != str(SCHEMA_VERSION):
            raise RetrievalError(f"{self.path}: index schema {version}, this edgellm reads {SCHEMA_VERSION}")
        self._matrix: np.ndarray | None = None
        self._ids = np.empty(0, dtype=np.int64)
        self._version: tuple[int, int] | None = None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def remember_bundle(self, bundle: Path) -> None:
        """The embedding bundle's path, so later searches need not name it."""
        self._set_meta("bundle", str(bundle.resolve()))

    def check_model(self, model: Encoder) -> None:
        """Refuse a model other than the one the index was built with (its vectors would not compare)."""
        built = self.meta("model")
        if built is not None and built != model_id(model):
            raise RetrievalError(f"{self.path}: built with embedding model {json.loads(built)['name']!r}, not "
                                 f"{model.name!r}; search it with that bundle or build a new index")

    # -- writing -------------------------------------------------------------------------------

    def add(self, paths: Iterable[str | os.PathLike[str]], model: Encoder,
            report: Callable[[Change], None] = lambda change: None) -> list[Change]:
        """Index the documents at `paths` (files, or folders walked for SUFFIXES): new and changed
        ones embedded and written one document per transaction, unchanged ones skipped, and
        indexed documents under a given folder that no longer exist there removed."""
        self.check_model(model)
        if self.meta("model") is None:
            self._set_meta("model", model_id(model))
        changes = []
        for root in (Path(p).resolve() for p in paths):
            if not root.exists():
                raise RetrievalError(f"{root}: no such file or directory")
            found = sorted(_documents(root))
            for doc in found:
                changes.append(self._add_one(doc, model))
                report(changes[-1])
            if root.is_dir():
                for gone in sorted(set(self._paths_under(root)) - {str(d) for d in found}):
                    changes.append(Change(gone, "removed", self._delete(gone)))
                    report(changes[-1])
        return changes

    def remove(self, paths: Iterable[str | os.PathLike[str]]) -> list[Change]:
        """Drop every indexed document at or under `paths` (the files themselves are not touched)."""
        changes = []
        for root in (Path(p).resolve() for p in paths):
            for path in sorted(self._paths_under(root)):
                changes.append(Change(path, "removed", self._delete(path)))
        return changes

    def _add_one(self, doc: Path, model: Encoder) -> Change:
        data = doc.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        row = self.db.execute("SELECT sha256 FROM documents WHERE path = ?", (str(doc),)).fetchone()
        if row is not None and row[0] == digest:
            return Change(str(doc), "unchanged")
        try:
            chunks = read_chunks(doc, data)
        except RetrievalError as exc:
            return Change(str(doc), "failed", error=str(exc))
        vectors = model.embed([c.embedded_text() for c in chunks]) if chunks else np.empty((0, model.dimensions))
        vectors = vectors.astype(np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # stored as unit vectors
        self._write(doc, digest, len(data), chunks, vectors)
        return Change(str(doc), "updated" if row is not None else "added", len(chunks))

    def _write(self, doc: Path, digest: str, size: int, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """The document's old rows out and its new ones in, as one transaction."""
        with self._transaction():
            self.db.execute("DELETE FROM documents WHERE path = ?", (str(doc),))
            cur = self.db.execute("INSERT INTO documents(path, sha256, size) VALUES (?, ?, ?)", (str(doc), digest, size))
            self.db.executemany(
                'INSERT INTO chunks(document, seq, heading, line, start, "end", text, vector) VALUES (?,?,?,?,?,?,?,?)',
                ((cur.lastrowid, i, c.heading, c.line, c.start, c.end, c.text, v.tobytes())
                 for i, (c, v) in enumerate(zip(chunks, vectors))))

    def _delete(self, path: str) -> int:
        with self._transaction():
            count = self.db.execute("SELECT count(*) FROM chunks JOIN documents d ON d.id = document "
                                    "WHERE d.path = ?", (path,)).fetchone()[0]
            self.db.execute("DELETE FROM documents WHERE path = ?", (path,))
        return count

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (the connection is in autocommit)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _paths_under(self, root: Path) -> list[str]:
        rows = self.db.execute("SELECT path FROM documents").fetchall()
        return [p for (p,) in rows if p == str(root) or p.startswith(str(root).rstrip(os.sep) + os.sep)]

    # -- reading -------------------------------------------------------------------------------

    def documents(self) -> list[tuple[str, int]]:
        """(path, chunks) of every indexed document."""
        return self.db.execute("SELECT d.path, count(c.id) FROM documents d LEFT JOIN chunks c ON c.document = d.id "
                               "GROUP BY d.id ORDER BY d.path").fetchall()

    def search(self, query: np.ndarray, k: int = 4) -> list[Hit]:
        """The `k` chunks whose vectors are most similar (cosine) to `query`'s."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise RetrievalError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
        matrix, ids = self._vectors()
        if not len(ids):
            return []
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != matrix.shape[1]:
            raise RetrievalError(f"query has {q.shape[0]} dimensions, the index {matrix.shape[1]}")
        scores = matrix @ (q / (np.linalg.norm(q) or 1.0))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top])]
        rows = {r[0]: r for r in self.db.execute(
            f'SELECT c.id, d.path, c.heading, c.line, c.start, c."end", c.text FROM chunks c JOIN documents d '
            f'ON d.id = c.document WHERE c.id IN ({",".join("?" * len(top))})', [int(ids[i]) for i in top])}
        return [Hit(float(scores[i]), *rows[int(ids[i])][1:], chunk=int(ids[i])) for i in top if int(ids[i]) in rows]

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every chunk's unit vector as one matrix, read again only when the file changed (one read
        transaction: a writer in another process commits whole documents around it)."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0], self.db.total_changes
        if self._matrix is not None and version == self._version:
            return self._matrix, self._ids
        self.db.execute("BEGIN")
        try:
            count = self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
            width = len(self.db.execute("SELECT vector FROM chunks LIMIT 1").fetchone()[0]) // 4 if count else 0
            matrix = np.empty((count, width), dtype=np.float32)  # filled row by row: no second copy
            ids = np.empty(count, dtype=np.int64)
            for i, (row_id, vector) in enumerate(self.db.execute("SELECT id, vector FROM chunks ORDER BY id")):
                ids[i] = row_id
                matrix[i] = np.frombuffer(vector, dtype=np.float32)
        finally:
            self.db.execute("COMMIT")
        self._matrix, self._ids, self._version = matrix, ids, version
        return matrix, ids


def _documents(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if not name.startswith(".") and Path(name).suffix.lower() in SUFFIXES:
                yield Path(folder) / name


def open_encoder(index: Index, given: Path | None, flag: str = "--embedding") -> Encoder:
    """The index's embedding model: the bundle `given` (remembered by the index), else the one it
    remembers; `flag` is what the caller calls the bundle's setting, for the messages."""
    import edgellm
    from .embed import EmbeddingModel

    bundle = given or (Path(index.meta("bundle")) if index.meta("bundle") else None)
    if bundle is None:
        raise RetrievalError(f"{index.path}: new index: name its embedding bundle with {flag} BUNDLE")
    model = edgellm.load(bundle)
    if not isinstance(model, EmbeddingModel):
        raise RetrievalError(f"{flag} {bundle}: a {model.manifest.graph.kind} bundle, not an embedding one")
    index.check_model(model)
    if given is not None:
        index.remember_bundle(given)
    return model


def retrieve(index: Index, model: Encoder, query: str, k: int = 4) -> list[Hit]:
    """The `k` chunks of `index` nearest to the text `query`, embedded by `model` (the index's own)."""
    index.check_model(model)
    return index.search(model.embed([query])[0], k)

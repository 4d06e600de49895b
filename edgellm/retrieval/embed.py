"""`EmbeddingModel`: an embedding bundle on an onnxruntime session, texts in, unit vectors out.

The graph pools and normalises (export/embedding.py), so this side only tokenizes, pads a batch
to its longest text and runs it. Texts are sorted by length before batching so a short text never
pays for a long one's padding; the answer keeps the caller's order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import threading

import numpy as np
from tokenizers import Tokenizer

from ..errors import GenerationError, RequestError
from ..runtime.bundle import Manifest, bundle_file
from ..runtime.providers import ProviderSpec, create_session

BATCH = 32  # texts a run: larger batches gain little on a CPU and pad more
MAX_TEXTS = 2048  # texts one request to a front may embed (OpenAI's limit)
MAX_CHARS = 1 << 16  # characters of one text read before truncation (the graph reads at most max_tokens)


class EmbeddingModel:
    """A loaded embedding bundle. `embed` is safe to call from one thread at a time."""

    def __init__(self, path: Path, manifest: Manifest, session: "object", tokenizer: Tokenizer) -> None:
        self.path = path
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.inputs: list[str] = list(manifest.graph.inputs)
        self.dimensions: int = manifest.graph.dimensions or 0  # bundle.Graph checked it is positive
        self.max_tokens: int = manifest.spec.max_context

    @classmethod
    def open(cls, root: Path, manifest: Manifest, providers: Sequence[ProviderSpec] | None = None,
             threads: int | None = None) -> "EmbeddingModel":
        tokenizer = Tokenizer.from_file(str(bundle_file(root, "tokenizer.json")))
        tokenizer.enable_truncation(manifest.spec.max_context)
        tokenizer.no_padding()  # batches are padded here, after sorting by length
        session = create_session(bundle_file(root, manifest.graph.file), providers=providers, threads=threads)
        return cls(root, manifest, session, tokenizer)

    @property
    def name(self) -> str:
        return self.manifest.name or self.path.name

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """One float32 row per text (a string is one text), unit length when the model normalises."""
        return self.embed_counted(texts)[0]

    def embed_counted(self, texts: str | Sequence[str], truncate: bool = True) -> tuple[np.ndarray, int]:
        """The vectors and the tokens read, for usage reports. A text longer than the model reads
        (`max_tokens`) is cut there, or refused when not `truncate` (Ollama's truncate: false)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        check_texts(texts)
        try:
            encoded = self.tokenizer.encode_batch([t[:MAX_CHARS] for t in texts])
        except TypeError:  # the tokenizer's word for a lone surrogate (\ud800-\udfff), which is not text
            raise GenerationError("input holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
        if not truncate and (long := [i for i, e in enumerate(encoded) if e.overflowing or len(texts[i]) > MAX_CHARS]):
            raise GenerationError(f"input[{long[0]}] is longer than the {self.max_tokens} tokens this model reads "
                                  f"(truncate it, or let the server cut it)")
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i].ids))
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        for start in range(0, len(order), BATCH):
            rows = order[start:start + BATCH]
            width = max(len(encoded[i].ids) for i in rows)
            feeds = {name: np.zeros((len(rows), width), dtype=np.int64) for name in
                     ("input_ids", "attention_mask", "token_type_ids")}
            for r, i in enumerate(rows):
                e = encoded[i]
                n = len(e.ids)
                feeds["input_ids"][r, :n] = e.ids
                feeds["attention_mask"][r, :n] = 1
                feeds["token_type_ids"][r, :n] = e.type_ids
            out[rows] = self.session.run(None, {name: feeds[name] for name in self.inputs})[0]
        return out, sum(len(e.ids) for e in encoded)


def check_texts(texts: list[object]) -> None:
    """A clear one-line error for what cannot be embedded (before any work)."""
    if not texts:
        raise GenerationError("input must hold at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise GenerationError(f"input[{i}] must be a string, got {type(text).__name__}")



class Embedder:
    """An EmbeddingModel shared by the fronts: one call runs at a time (a CPU has no room for two),
    and at most `max_waiting` wait for it; the rest are refused at once rather than queued unbounded."""

    def __init__(self, model: EmbeddingModel, max_waiting: int = 8) -> None:
        self.model = model
        self.max_waiting = max_waiting
        self._run = threading.Lock()
        self._count = threading.Lock()
        self._waiting = 0

    def embed(self, texts: str | Sequence[str], truncate: bool = True) -> tuple[np.ndarray, int]:
        """Wait for the model and embed; RequestError "busy" at once when too many wait."""
        self.admit(1 if isinstance(texts, str) else len(texts))
        return self.admitted(texts, truncate)

    def admit(self, count: int) -> None:
        """Take a place to wait, or refuse: a front that runs the work on a thread of its own asks
        here first, on its receiving thread, so a flood of requests never becomes a flood of threads."""
        if count > MAX_TEXTS:
            raise GenerationError(f"input holds {count} texts, at most {MAX_TEXTS} a request")
        with self._count:
            if self._waiting >= self.max_waiting:
                raise RequestError("busy", f"busy: {self._waiting} embedding requests are waiting")
            self._waiting += 1

    def vector(self, text: str) -> np.ndarray:
        """One text's vector for a request's retrieval: it waits its turn on the model as any embedding
        call does, but takes no place to wait here (the engine's queue bounds those requests)."""
        with self._run:
            return self.model.embed([text])[0]

    def admitted(self, texts: str | Sequence[str], truncate: bool = True) -> tuple[np.ndarray, int]:
        """Embed for a request `admit` let in, then give its place back."""
        try:
            with self._run:
                return self.model.embed_counted(texts, truncate)
        finally:
            with self._count:
                self._waiting -= 1

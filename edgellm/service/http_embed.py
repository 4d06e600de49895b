"""Embedding routes: OpenAI's /v1/embeddings, Ollama's /api/embed and its older /api/embeddings.

They answer from the embedding bundle `edgellm serve --embedding` loaded beside the generative
one (`Front.embedder`); the vectors are computed on a worker thread, one request at a time
(`retrieval.embed.Embedder`), so the event loop keeps serving the other routes.
"""
from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import GenerationError, RequestError
from ..retrieval.embed import Embedder
from .http import Front, HttpError


def _embedder(front: Front, name: Any, field: str = "model") -> Embedder:
    """The served embedding model, if `name` (optional, as for generation) names it."""
    embedder: Embedder | None = front.embedder
    if embedder is None:
        raise HttpError(404, "this server serves no embedding model (edgellm serve --embedding BUNDLE)",
                        param=field, code="model_not_found")
    if name is None:
        return embedder
    model = embedder.model
    names = {n for base in (model.name, model.path.name) for n in (base, f"{base}:latest")}
    if not isinstance(name, str):
        raise HttpError(400, f"{field} must be a string, got {type(name).__name__}", param=field)
    if name not in names:
        raise HttpError(404, f"model {name!r} serves no embeddings; this server embeds with {model.name!r}",
                        param=field, code="model_not_found")
    return embedder


async def _vectors(embedder: Embedder, texts: Any, field: str, truncate: bool = True) -> tuple[np.ndarray, int]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise HttpError(400, f"{field} must be a string or a list of strings (token ids are not accepted)",
                        param=field)
    try:
        return await asyncio.to_thread(embedder.embed, texts, truncate)
    except RequestError as exc:
        raise HttpError(429, str(exc), code="busy", headers={"Retry-After": "1"}) from None
    except GenerationError as exc:
        raise HttpError(400, str(exc).replace("input", field, 1), param=field) from None


def _dimensions(body: dict[str, Any], embedder: Embedder) -> None:
    wanted = body.get("dimensions")
    if wanted is not None and wanted != embedder.model.dimensions:
        raise HttpError(400, f"dimensions {wanted!r}: this model's vectors have {embedder.model.dimensions}",
                        param="dimensions")


async def openai_embeddings(front: Front, request: Request) -> Response:
    body = await front.read_json(request)
    embedder = _embedder(front, body.get("model"))
    _dimensions(body, embedder)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise HttpError(400, f"encoding_format {encoding!r}: expected float or base64", param="encoding_format")
    vectors, tokens = await _vectors(embedder, body.get("input"), "input")
    if encoding == "base64":  # what the openai package asks for by default: float32, little-endian
        rows: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        rows = vectors.tolist()
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    return JSONResponse({"object": "list", "data": data, "model": embedder.model.name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def ollama_embed(front: Front, request: Request) -> Response:
    start = time.perf_counter_ns()
    body = await front.read_json(request)
    embedder = _embedder(front, body.get("model"))
    _dimensions(body, embedder)
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise HttpError(400, "truncate must be true or false", param="truncate")
    vectors, tokens = await _vectors(embedder, body.get("input"), "input", truncate)
    name = embedder.model.name
    return JSONResponse({"model": name if ":" in name else f"{name}:latest", "embeddings": vectors.tolist(),
                         "total_duration": time.perf_counter_ns() - start, "load_duration": 0,
                         "prompt_eval_count": tokens})


async def ollama_embeddings(front: Front, request: Request) -> Response:
    """The older route: one `prompt`, one `embedding`."""
    body = await front.read_json(request)
    embedder = _embedder(front, body.get("model"))
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise HttpError(400, "prompt must be a string", param="prompt")
    vectors, _ = await _vectors(embedder, prompt, "prompt")
    return JSONResponse({"embedding": vectors[0].tolist()})


ROUTES = [
    ("/v1/embeddings", ["POST"], openai_embeddings),
    ("/api/embed", ["POST"], ollama_embed),
    ("/api/embeddings", ["POST"], ollama_embeddings),
]

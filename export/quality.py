"""The quality gate: perplexity of an exported graph against its source's.

A faster graph that answers worse is not faster, so every export measures both on
the same text and stores them in the manifest. The "source" is the fp32 graph of
the same weights (for GGUF: the dequantized blocks), so the ratio isolates what
quantization and graph building cost.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgellm.runtime.bundle import Graph
from edgellm.runtime.caches import kv_dtype, kv_shape
from edgellm.runtime.model_spec import ModelSpec
from edgellm.runtime.providers import session_options

# A fixed English paragraph (about 230 tokens for SmolLM2's tokenizer); the built-in
# default so numbers are comparable across exports and releases.
DEFAULT_TEXT = (
    "The old lighthouse stood at the end of a narrow spit of rock, where the river met the sea. "
    "For more than a century its keepers had climbed the spiral stairs each evening to light the lamp, "
    "and each morning they had written the weather, the ships that passed and the state of the glass "
    "in a heavy logbook bound in green cloth. When the light was automated in the nineteen eighties, "
    "the last keeper moved to a cottage in the village and took the logbooks with him. Historians later "
    "found them invaluable: the entries recorded storms that never reached the newspapers, the slow "
    "change of the coastline as sand built up along the northern shore, and the gradual shift from sail "
    "to steam and then to diesel. Today the lighthouse is a small museum. Visitors can read a few pages "
    "of the logbooks behind glass, look out over the water from the gallery, and imagine the long winter "
    "nights when a single flame, magnified by a great lens, was all that kept sailors from the rocks below."
)
MAX_EVAL_TOKENS = 512


def eval_ids(tokenizer_json: str, generation: dict[str, Any], max_context: int, text: str | None = None) -> list[int]:
    """The token ids the gate reads: `text` (default DEFAULT_TEXT) as the model sees it, with
    its BOS when the model adds one. A bundle carries all three inputs, so a perplexity
    measured later (on another machine or CPU) reads exactly the export's tokens."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json).encode(text or DEFAULT_TEXT, add_special_tokens=False).ids
    bos = generation.get("bos_token_id")
    if generation.get("add_bos_token") and bos is not None:
        ids = [bos, *ids]
    return ids[: min(MAX_EVAL_TOKENS, max_context)]


def _feeds(graph: Graph, spec: ModelSpec, ids: np.ndarray) -> dict[str, np.ndarray]:
    seq = ids.shape[1]
    empty = np.zeros(kv_shape(graph.target, 0, spec.num_kv_heads, spec.head_dim), dtype=kv_dtype(graph.kv_dtype))
    feeds: dict[str, np.ndarray] = {}
    for name in graph.inputs:
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = np.ones((1, seq), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(seq, dtype=np.int64)[None, :]
        elif name == "logits_to_keep":
            feeds[name] = np.array([seq], dtype=np.int64)
        elif name.startswith("past_key_values."):
            feeds[name] = empty
        else:
            raise ValueError(f"graph input {name!r} is not understood by the quality gate")
    return feeds


def token_nll(model_path: Path, graph: Graph, spec: ModelSpec, ids: list[int], threads: int = 0,
              config: dict[str, str] | None = None) -> np.ndarray:
    """Negative log-likelihood of each token given the ones before it (len(ids) - 1 values),
    with the runtime's session options. `config`: more session config entries (e.g.
    mlas.disable_kleidiai), to measure what a kernel choice costs."""
    opts = session_options(threads or None, graph.block_sums)
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    arr = np.asarray(ids, dtype=np.int64)[None, :]
    if graph.layout == "fixed":  # a one-token graph: the text goes a step a token
        from edgellm.runtime.runner import OneTokenRunner

        logits = OneTokenRunner(session, where=str(model_path)).forward_all(ids[:-1]).astype(np.float64)
    else:
        (logits,) = session.run(["logits"], _feeds(graph, spec, arr))
        logits = logits[0, :-1].astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    return logz - logits[np.arange(len(ids) - 1), arr[0, 1:]]


def perplexity(model_path: Path, graph: Graph, spec: ModelSpec, ids: list[int]) -> float:
    return float(np.exp(token_nll(model_path, graph, spec, ids).mean()))

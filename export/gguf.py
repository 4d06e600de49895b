"""GGUF files as a `Source`: llama.cpp metadata, tensors and vocabulary in HF terms.

The file is memory-mapped; tensors are dequantized one at a time on request, so a
model's weights never sit in memory twice. llama.cpp's converter rewrites some
tensors (q/k rows permuted for interleaved rotary) and stores the tokenizer as bare
metadata; both are undone here so the graph builder sees what a HF folder gives.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS, ReaderTensor
from gguf.quants import dequantize

from edgellm.errors import ExportError
from edgellm.runtime.bundle import sha256_file

from . import arch
from .gguf_blocks import TYPES
from .gguf_vocab import build_tokenizer, generation_config
from .sources import QuantBlocks

if TYPE_CHECKING:
    from .lora import LoraAdapter

# Types whose blocks MatMulNBits takes without rounding them again (gguf_blocks.py).
EXACT_TYPES = tuple(TYPES)

_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str, block: dict[str, str]) -> str | None:
    """The HF name of a GGUF tensor under a family's block names, or None when unknown."""
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{block[part]}.{kind}" if part in block else None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL[stem]}.{kind}" if stem in _GLOBAL and kind in ("weight", "bias") else None


def open_gguf(path: Path) -> "GGUFSource":
    """Open a GGUF file; ExportError for anything that is not a usable model."""
    path = Path(path)
    return GGUFSource(path, read_gguf(path))


def read_gguf(path: Path) -> GGUFReader:
    """A GGUF file's reader (a model or a LoRA adapter); ExportError for a missing, foreign or corrupt file."""
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF":
        raise ExportError(f"{path}: not a GGUF file (magic {head[:4]!r})")
    if len(head) < 8:
        raise ExportError(f"{path}: truncated GGUF file ({len(head)} bytes)")
    version = int.from_bytes(head[4:], "little")
    # Big-endian files are legal; their version reads byte-swapped.
    if not {version, int.from_bytes(head[4:], "big")} & set(READER_SUPPORTED_VERSIONS):
        raise ExportError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    try:
        return GGUFReader(path)
    except Exception as exc:  # GGUFReader fails with ValueError, KeyError, IndexError... mid-parse
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ExportError(f"{path}: truncated or corrupt GGUF file ({reason})") from None


class GGUFSource:
    """A GGUF model under HF tensor names, with its spec and a rebuilt tokenizer."""

    def __init__(self, path: Path, reader: GGUFReader) -> None:
        self.path = path
        self.reader = reader  # raw access: tensor types, fields the spec does not carry
        self.meta: dict[str, Any] = {name: f.contents() for name, f in reader.fields.items()}
        if self.meta.get("general.type") == "adapter":
            raise ExportError(f"{path}: a LoRA adapter, not a model (give it to --lora beside its base model)")
        self.lora: LoraAdapter | None = None  # merged into the weights it adapts (attach_lora)
        gguf_arch = self.meta.get("general.architecture")
        family = arch.by_gguf_arch(gguf_arch)
        if family is None:
            supported = ", ".join(a for f in arch.FAMILIES for a in f.gguf_archs)
            raise ExportError(f"{path}: general.architecture {gguf_arch!r} is not supported (supported: {supported})")
        self.family = family
        self._tensors: dict[str, ReaderTensor] = {}
        extras: dict[str, np.ndarray] = {}
        for tensor in reader.tensors:
            if tensor.name in family.gguf_extras:
                extras[tensor.name] = _dequantized(tensor, path)
                continue
            name = hf_name(tensor.name, family.gguf_block)
            if name is None:
                raise ExportError(f"{path}: tensor {tensor.name!r} has no known HF equivalent")
            self._tensors[name] = tensor
        self.shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in self._tensors.items()}
        self.spec = family.read_gguf(arch.GGUFMeta(gguf_arch, self.meta, self.shapes, extras, str(path)))
        # GGUF type names by HF tensor name, for the export notes.
        self.stored_types = {name: t.tensor_type.name for name, t in self._tensors.items()}
        self.tokenizer_json = build_tokenizer(self.meta, where=str(path)).to_str()
        self.chat_template: str | None = self.meta.get("tokenizer.chat_template")
        # A GGUF without a template gets its family's known one; describe() says so.
        self.template_from = "gguf" if self.chat_template else None
        if self.chat_template is None and family.chat_template is not None:
            self.chat_template, self.template_from = family.chat_template, f"{family.name} family default"
        self.generation = generation_config(self.meta)

    def attach_lora(self, adapter: LoraAdapter) -> None:
        """Merge `adapter` into the weights it adapts, once each is dequantized (HF names and rows)."""
        adapter.check(self.shapes, self.path)
        self.lora = adapter

    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        weight = self._rows(name, _dequantized(self._get(name), self.path))
        if self.lora is not None:
            weight = self.lora.merge(name, weight)
        return np.ascontiguousarray(weight, dtype=np.float32)

    def quant_blocks(self, name: str) -> QuantBlocks | None:
        tensor = self._get(name)
        kind = tensor.tensor_type.name
        # A merged weight is no longer its blocks: it is rounded afresh from W + scale * B @ A.
        if kind not in EXACT_TYPES or (self.lora is not None and self.lora.adapts(name)):
            return None
        out_features, in_features = (int(d) for d in reversed(tensor.shape))
        blocks = np.ascontiguousarray(self._rows(name, np.asarray(tensor.data)), dtype=np.uint8)
        return QuantBlocks(kind, (out_features, in_features), blocks)

    def describe(self) -> dict[str, Any]:
        file_type = self.meta.get("general.file_type")
        try:
            file_type_name = None if file_type is None else LlamaFileType(file_type).name
        except ValueError:
            file_type_name = str(file_type)
        return {
            "kind": "gguf",
            "path": str(self.path),
            "sha256": sha256_file(self.path),
            "file_type": file_type_name,
            "tensor_types": dict(Counter(t.tensor_type.name for t in self.reader.tensors)),
            "chat_template": self.template_from,
            **({"lora": self.lora.describe()} if self.lora is not None else {}),
        }

    def _get(self, name: str) -> ReaderTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise ExportError(f"{self.path}: no tensor {name!r}") from None

    def _rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        return self.family.gguf_rows(name, rows, self.spec)


def _dequantized(tensor: ReaderTensor, path: Path) -> np.ndarray:
    """float32 values in numpy order ([out, in] for a linear weight)."""
    try:
        kind = GGMLQuantizationType(tensor.tensor_type)
        values = dequantize(np.asarray(tensor.data), kind)
    except NotImplementedError:
        raise ExportError(f"{path}: tensor {tensor.name!r}: cannot dequantize {tensor.tensor_type.name}") from None
    return values.reshape([int(d) for d in reversed(tensor.shape)]).astype(np.float32, copy=False)

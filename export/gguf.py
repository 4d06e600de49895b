"""GGUF files as a `Source`: llama.cpp metadata, tensors and vocabulary in HF terms.

The file is memory-mapped; tensors are dequantized one at a time on request, so a
model's weights never sit in memory twice. llama.cpp's converter rewrites some
tensors (q/k rows permuted for interleaved rotary) and stores the tokenizer as bare
metadata; both are undone here so the graph builder sees what a HF folder gives.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS, ReaderTensor
from gguf.quants import dequantize

from edgellm.errors import ExportError
from edgellm.spec import ModelSpec

from .gguf_vocab import build_tokenizer, generation_config
from .sources import QuantBlocks

# general.architecture values whose layout the fast graph handles. Mistral checkpoints
# are converted by llama.cpp under "llama", so they arrive here as llama.
ARCHS = ("llama", "qwen2", "qwen3")
# llama.cpp's LlamaModel permutes q/k rows for its interleaved rotary; its Qwen2/Qwen3
# converters keep HF's rotate-half order.
PERMUTED_ARCHS = ("llama",)
# Types whose blocks MatMulNBits / GatherBlockQuantized can take without requantizing.
EXACT_TYPES = ("Q4_0", "Q4_1", "Q8_0")

_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Per-dimension rotary divisors that llama.cpp writes for llama3 rope scaling
# instead of metadata; folded back into the HF rope_scaling dict.
_ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None when the name is not a known one."""
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK[part]}.{kind}" if part in _BLOCK else None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL[stem]}.{kind}" if stem in _GLOBAL and kind in ("weight", "bias") else None


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: interleaved rotary pairs back to rotate-half.

    Works on any array whose first axis is the output feature (weights, biases, raw
    quantized block rows), since llama.cpp permutes whole rows.
    """
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def open_gguf(path: Path) -> "GGUFSource":
    """Open a GGUF file; ExportError for anything that is not a usable model."""
    path = Path(path)
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
        reader = GGUFReader(path)
    except Exception as exc:  # GGUFReader fails with ValueError, KeyError, IndexError... mid-parse
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ExportError(f"{path}: truncated or corrupt GGUF file ({reason})") from None
    return GGUFSource(path, reader)


class GGUFSource:
    """A GGUF model under HF tensor names, with its spec and a rebuilt tokenizer."""

    def __init__(self, path: Path, reader: GGUFReader) -> None:
        self.path = path
        self.reader = reader  # raw access: tensor types, fields the spec does not carry
        self.meta: dict[str, Any] = {name: f.contents() for name, f in reader.fields.items()}
        self._tensors: dict[str, ReaderTensor] = {}
        by_gguf = {t.name: t for t in reader.tensors}
        for gguf_name, tensor in by_gguf.items():
            if gguf_name == _ROPE_FREQS:
                continue
            name = hf_name(gguf_name)
            if name is None:
                raise ExportError(f"{path}: tensor {gguf_name!r} has no known HF equivalent")
            self._tensors[name] = tensor
        rope_freqs = by_gguf.get(_ROPE_FREQS)
        self.spec = read_spec(
            self.meta,
            self._tensors,
            None if rope_freqs is None else _dequantized(rope_freqs, path),
            where=str(path),
        )
        self.tokenizer_json = build_tokenizer(self.meta, where=str(path)).to_str()
        self.chat_template: str | None = self.meta.get("tokenizer.chat_template")
        self.generation = generation_config(self.meta)

    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self._rows(name, _dequantized(self._get(name), self.path)), dtype=np.float32)

    def quant_blocks(self, name: str) -> QuantBlocks | None:
        tensor = self._get(name)
        kind = tensor.tensor_type.name
        if kind not in EXACT_TYPES:
            return None
        out_features, in_features = (int(d) for d in reversed(tensor.shape))
        blocks = np.ascontiguousarray(self._rows(name, np.asarray(tensor.data)), dtype=np.uint8)
        return QuantBlocks(kind, (out_features, in_features), blocks)

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        with self.path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        file_type = self.meta.get("general.file_type")
        try:
            file_type_name = None if file_type is None else LlamaFileType(file_type).name
        except ValueError:
            file_type_name = str(file_type)
        return {
            "kind": "gguf",
            "path": str(self.path),
            "sha256": digest.hexdigest(),
            "file_type": file_type_name,
            "tensor_types": dict(Counter(t.tensor_type.name for t in self.reader.tensors)),
        }

    def _get(self, name: str) -> ReaderTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise ExportError(f"{self.path}: no tensor {name!r}") from None

    def _rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        if self.spec.arch not in PERMUTED_ARCHS:
            return rows
        if ".self_attn.q_proj." in name:
            return unpermute_rows(rows, self.spec.num_heads)
        if ".self_attn.k_proj." in name:
            return unpermute_rows(rows, self.spec.num_kv_heads)
        return rows


def _dequantized(tensor: ReaderTensor, path: Path) -> np.ndarray:
    """float32 values in numpy order ([out, in] for a linear weight)."""
    try:
        kind = GGMLQuantizationType(tensor.tensor_type)
        values = dequantize(np.asarray(tensor.data), kind)
    except NotImplementedError:
        raise ExportError(f"{path}: tensor {tensor.name!r}: cannot dequantize {tensor.tensor_type.name}") from None
    return values.reshape([int(d) for d in reversed(tensor.shape)]).astype(np.float32, copy=False)


def read_spec(
    meta: dict[str, Any], tensors: dict[str, Any], rope_freqs: np.ndarray | None, where: str
) -> ModelSpec:
    """ModelSpec from llama.cpp metadata; tensors (by HF name) settle tying, biases and norms."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise ExportError(f"{where}: general.architecture {arch!r} is not supported (expected {ARCHS})")

    def key(name: str, default: Any = ...) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is ...:
            raise ExportError(f"{where}: metadata {arch}.{name} is missing")
        return value

    hidden = int(key("embedding_length"))
    heads_key = f"{where}: {arch}.attention.head_count"
    num_heads = _per_layer(key("attention.head_count"), heads_key)
    num_kv_heads = _per_layer(key("attention.head_count_kv", num_heads), f"{heads_key}_kv")
    head_dim = int(key("attention.key_length", hidden // num_heads))
    rotary = int(key("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ExportError(f"{where}: {arch}.rope.dimension_count {rotary} is not the head dim {head_dim}")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ExportError(f"{where}: metadata tokenizer.ggml.tokens is missing")
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise ExportError(f"{where}: tensor token_embd.weight is missing")
    rows = int(embed.shape[-1])
    if rows != len(tokens):
        raise ExportError(f"{where}: token_embd.weight has {rows} rows for {len(tokens)} tokens")
    theta = float(key("rope.freq_base", 10000.0))
    window = key("attention.sliding_window", None)
    try:
        return ModelSpec(
            arch=arch,
            num_layers=int(key("block_count")),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            vocab_size=len(tokens),
            max_context=int(key("context_length")),
            rope_theta=theta,
            rope_scaling=_rope_scaling(meta, arch, rope_freqs, theta, head_dim, where),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="lm_head.weight" not in tensors,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
            qk_norm="model.layers.0.self_attn.q_norm.weight" in tensors,
            sliding_window=None if window is None else int(window),
        )
    except ValueError as exc:
        raise ExportError(f"{where}: {exc}") from None


def _per_layer(value: Any, where: str) -> int:
    """llama.cpp may store head counts per layer; the graph needs them uniform."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ExportError(f"{where} differs between layers ({sorted(set(value))})")
        value = value[0]
    return int(value)


def _rope_scaling(
    meta: dict[str, Any], arch: str, rope_freqs: np.ndarray | None, theta: float, head_dim: int, where: str
) -> dict[str, Any] | None:
    if rope_freqs is not None:
        return llama3_scaling(rope_freqs, theta, head_dim, where)
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "none" or factor is None or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise ExportError(f"{where}: {arch}.rope.scaling.type {kind!r} is not supported (expected linear or yarn)")


def llama3_scaling(
    factors: np.ndarray, theta: float, head_dim: int, where: str = "rope_freqs.weight"
) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's per-dimension divisors.

    Dimensions between the two wavelength cut-offs have 1/divisor linear in
    1/wavelength; the line gives the cut-offs. Only their ratio to the original
    context is determined, so low_freq_factor is fixed at Llama 3's 1.0. The result
    is checked by recomputing every divisor.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise ExportError(f"{where}: {factors.size} rope factors for head dim {head_dim}")
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    wavelen = 2 * math.pi / inv_freq
    middle = (factors > 1.0 + 1e-4) & (factors < factor * (1 - 1e-4))
    if middle.sum() >= 2:
        smooth = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[middle], smooth, 1)
        high = 1.0 - 1.0 / intercept  # smooth = old_ctx/((h-1)·wavelen) - 1/(h-1)
        original = round(slope * (high - 1.0))
    else:  # no transition to fit: Llama 3's published cut-offs, verified below
        high, original = 4.0, 8192
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": int(original),
    }
    if not np.allclose(llama3_factors(scaling, theta, head_dim), factors, rtol=1e-3):
        raise ExportError(f"{where}: rope factors do not follow llama3 rope scaling")
    return scaling


def llama3_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Per-dimension divisors of the base rotary frequencies under HF's llama3 scaling."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)

"""A Hugging Face checkpoint folder as a `Source`: config, safetensors, tokenizer.

Safetensors headers are parsed here and tensors memory-mapped on demand, without
torch: bf16 has no numpy dtype, so it is widened to float32 by shifting its bits
into the high half of a uint32.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgellm.errors import ExportError
from edgellm.runtime.model_spec import ModelSpec

from . import arch

if TYPE_CHECKING:
    from .lora import LoraAdapter

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
_MAX_HEADER = 100 << 20


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: not a JSON object")
    return data


def _read_optional_json(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


class _SafetensorsFile:
    """One .safetensors file: its header, validated against the file size up front."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ExportError(f"{path}: truncated safetensors file (no header)")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _MAX_HEADER):
                raise ExportError(f"{path}: corrupt safetensors header (length {length}, file size {size})")
            try:
                header = json.loads(fh.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ExportError(f"{path}: corrupt safetensors header (not JSON)") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ExportError(f"{path}: corrupt safetensors entry {name!r}") from None
            if dtype not in _DTYPES:
                raise ExportError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
            if end - begin != nbytes or begin < 0:
                raise ExportError(f"{path}: tensor {name!r} has inconsistent offsets")
            if self.data_start + end > size:
                raise ExportError(f"{path}: truncated (tensor {name!r} ends past the end of the file)")
            self.entries[name] = (dtype, shape, begin, end)

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        raw = np.memmap(self.path, dtype=_DTYPES[dtype], mode="r", offset=self.data_start + begin, shape=shape)
        if dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return np.array(raw, dtype=np.float32)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ExportError(f"{index}: field 'weight_map' is missing")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise ExportError(f"{path}: listed in {index.name} but missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def read_spec(config: dict[str, Any], where: Path) -> ModelSpec:
    """ModelSpec from a HF config.json dict; shapes only for an architecture without a fast graph."""
    family = arch.by_hf_type(config.get("model_type"))
    if family is None:
        return generic_spec(config, where)
    return family.read_hf(config, where)


# Names other model families give the fields the runtime sizes its KV cache by.
_ALIASES = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_sequence_length"),
}


def generic_spec(config: dict[str, Any], where: Path) -> ModelSpec:
    """The shapes of a decoder the optimum path exports: enough for the runtime's KV cache.

    Read before the path is chosen, so it must not refuse what only the fast graph cannot do.
    """
    arch = config.get("model_type")
    if not isinstance(arch, str):
        raise ExportError(f"{where}: field 'model_type' is missing")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def pick(field: str, default: Any = ...) -> Any:
        for name in _ALIASES.get(field, (field,)):
            if text.get(name) is not None:
                return text[name]
        if default is ...:
            raise ExportError(f"{where}: field {field!r} is missing")
        return default

    try:
        heads = int(pick("num_attention_heads"))
        hidden = int(pick("hidden_size"))
        kv_heads = 1 if text.get("multi_query") else int(pick("num_key_value_heads", heads))
        return ModelSpec(
            arch=arch,
            num_layers=int(pick("num_hidden_layers")),
            hidden_size=hidden,
            intermediate_size=int(pick("intermediate_size", 4 * hidden)),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(pick("head_dim", hidden // heads)),
            vocab_size=int(pick("vocab_size")),
            max_context=int(pick("max_position_embeddings", 2048)),
            tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        )
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{where}: invalid value ({exc})") from None


def _token_string(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _token_id(tokenizer: dict[str, Any], text: str | None) -> int | None:
    if text is None:
        return None
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == text:
            return int(added["id"])
    vocab = tokenizer.get("model", {}).get("vocab")
    return vocab.get(text) if isinstance(vocab, dict) else None


def read_generation(
    config: dict[str, Any], gen_config: dict[str, Any], tok_config: dict[str, Any], tokenizer: dict[str, Any]
) -> dict[str, Any]:
    """bos/eos/pad ids and sampling defaults; generation_config.json wins over config.json."""

    def pick(key: str) -> Any:
        return gen_config.get(key, config.get(key))

    bos_token = _token_string(tok_config.get("bos_token"))
    eos_token = _token_string(tok_config.get("eos_token"))
    bos_id = pick("bos_token_id")
    eos = pick("eos_token_id")
    if eos is None:
        eos = _token_id(tokenizer, eos_token)
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    return {
        "bos_token_id": int(bos_id) if bos_id is not None else _token_id(tokenizer, bos_token),
        "eos_token_ids": eos_ids,
        "pad_token_id": pick("pad_token_id"),
        "add_bos_token": bool(tok_config.get("add_bos_token", False)),
        "bos_token": bos_token,
        "eos_token": eos_token,
        "defaults": {k: gen_config[k] for k in _SAMPLING_KEYS if gen_config.get(k) is not None},
    }


# Where image-text checkpoints (Gemma3ForConditionalGeneration) keep their text decoder:
# the original layout and the one transformers >= 4.52 uses in memory.
_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                  "language_model.lm_head.": "lm_head."}


def _text_name(stored: str) -> str:
    """The causal-LM name of a stored tensor (other towers keep theirs, and go unread)."""
    for prefix, plain in _TEXT_PREFIXES.items():
        if stored.startswith(prefix):
            return plain + stored[len(prefix):]
    return stored


class HFSource:
    """A HF checkpoint folder; tensors are read from disk only when asked for."""

    def __init__(self, path: Path, lora: LoraAdapter | None = None) -> None:
        self.path = path
        self.lora = lora  # merged into each weight as it is read, before any family transform
        config = _read_json(path / "config.json") if (path / "config.json").is_file() else None
        if config is None:
            raise ExportError(f"{path / 'config.json'}: missing (is {path} a Hugging Face model folder?)")
        self.spec = read_spec(config, path / "config.json")
        self.family = arch.by_hf_type(config.get("model_type"))
        tok_path = path / "tokenizer.json"
        if not tok_path.is_file():
            raise ExportError(f"{tok_path}: missing (the fast export needs a tokenizers tokenizer.json)")
        self.tokenizer_json = tok_path.read_text(encoding="utf-8")
        tok_config = _read_optional_json(path / "tokenizer_config.json")
        template = tok_config.get("chat_template")
        jinja = path / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        self.chat_template = template if isinstance(template, str) else None
        self.generation = read_generation(
            config,
            _read_optional_json(path / "generation_config.json"),
            tok_config,
            json.loads(self.tokenizer_json),
        )
        self.files = _weight_files(path)
        # HF name -> (file, the name stored in it).
        self._where: dict[str, tuple[_SafetensorsFile, str]] = {}
        for file in self.files:
            st = _SafetensorsFile(file)
            for stored in st.entries:
                self._where[_text_name(stored)] = (st, stored)
        if lora is not None:
            lora.check(list(self._where), path)

    def names(self) -> list[str]:
        return list(self._where)

    def tensor(self, name: str) -> np.ndarray:
        st, stored = self._where.get(name, (None, name))
        if st is None:
            raise ExportError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        weight = st.read(stored) if self.lora is None else self.lora.merge(name, st.read(stored))
        return weight if self.family is None else self.family.hf_tensor(name, weight)

    def quant_blocks(self, name: str) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for file in self.files:
            with open(file, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
        return {
            "kind": "hf",
            "path": str(self.path),
            "sha256": digest.hexdigest(),
            "files": [f.name for f in self.files],
            **({"lora": self.lora.describe()} if self.lora is not None else {}),
        }


def open_hf_folder(path: Path, lora: LoraAdapter | None = None) -> HFSource:
    """Open a HF checkpoint folder (llama, mistral, qwen2, qwen3 in safetensors), with `lora` merged."""
    return HFSource(Path(path), lora)

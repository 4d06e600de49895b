"""LoRA adapters merged into a base's weights as they are read, before quantization.

A plant's fine-tune (a LoRA adapter trained on its own tickets) then costs nothing at run time:
the bundle is an ordinary one whose weights are W + scale * B @ A. Two adapter formats:
peft's folder (adapter_config.json + adapter_model.safetensors; scale alpha / r, or
alpha / sqrt(r) with rsLoRA) and llama.cpp's adapter GGUF, as convert_lora_to_gguf.py writes it
and llama.cpp loads it (llama-adapter.cpp): general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and `<base tensor>.lora_a` [r, in] / `.lora_b` [out, r] pairs in GGUF names
and llama.cpp's row order, scale alpha / r with r each pair's own (1 when alpha is 0). Either is
held here under HF names and layout, so one merge serves HF and GGUF bases. Only what merges
exactly into a linear weight is taken; DoRA, Conv1D's transposed layout, per-module ranks,
trained extra modules, embedding adapters and activated LoRA are refused by name rather than
merged wrong.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgellm.errors import ExportError
from edgellm.runtime.bundle import sha256_file

from .hf import _SafetensorsFile

if TYPE_CHECKING:
    from .gguf import GGUFSource

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_REFUSED = {  # adapter_config.json key -> why it cannot be merged as W + scale * B @ A here
    "use_dora": "DoRA rescales each weight's columns",
    "fan_in_fan_out": "Conv1D (GPT-2) layers store weights transposed",
    "modules_to_save": "trained copies of whole modules",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
}


@dataclass(frozen=True)
class _Pair:
    a: np.ndarray  # float32 [r, in]
    b: np.ndarray  # float32 [out, r], HF row order
    scale: float


class LoraAdapter:
    """One adapter, read at once (adapters are small): `merge(name, weight)` per base tensor."""

    def __init__(self, path: Path, kind: str, pairs: dict[str, _Pair], alpha: float, sha256: str) -> None:
        if not pairs:
            raise ExportError(f"--lora {path}: no LoRA matrices")
        self.path, self.kind, self.alpha, self.sha256 = path, kind, alpha, sha256
        self._pairs = pairs

    def check(self, names: Iterable[str], where: Path) -> None:
        """Every adapted weight must be in the base, at the adapter's shape (when `names` maps
        names to shapes): an adapter for another model is refused before anything is read."""
        missing = sorted(set(self._pairs) - set(names))
        if missing:
            raise ExportError(f"--lora {self.path}: adapts {missing[0]!r}, which {where} does not have "
                              f"(an adapter for another model?)")
        if isinstance(names, Mapping):
            for name in self._pairs:
                self._shape_check(name, tuple(names[name]))

    def adapts(self, name: str) -> bool:
        return name in self._pairs

    def merge(self, name: str, weight: np.ndarray) -> np.ndarray:
        """`weight` (HF layout, out x in) with its adapter's update, in its own dtype."""
        pair = self._pairs.get(name)
        if pair is None:
            return weight
        self._shape_check(name, weight.shape)
        return (weight.astype(np.float32) + pair.scale * (pair.b @ pair.a)).astype(weight.dtype)

    def _shape_check(self, name: str, shape: tuple[int, ...]) -> None:
        pair = self._pairs[name]
        if shape != (pair.b.shape[0], pair.a.shape[1]):
            raise ExportError(f"--lora {self.path}: {name} is {shape} in the base, "
                              f"{(pair.b.shape[0], pair.a.shape[1])} in the adapter (an adapter for another model?)")

    def describe(self) -> dict[str, Any]:
        ranks = sorted({p.a.shape[0] for p in self._pairs.values()})
        return {"format": self.kind, "path": str(self.path), "sha256": self.sha256,
                "r": ranks[0] if len(ranks) == 1 else ranks, "alpha": self.alpha, "weights": len(self._pairs)}

    def note(self, stored_types: Mapping[str, str]) -> str:
        """The manifest's note: what was merged, and for a GGUF base what those weights were."""
        line = f"LoRA ({self.kind} adapter): {len(self._pairs)} weights merged as W + scale * B @ A in float32"
        kinds = Counter(stored_types[name] for name in self._pairs if name in stored_types)
        if kinds:
            held = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
            line += (f" into the GGUF's dequantized values ({held}): a merged weight is no longer its blocks, "
                     "so it takes the form a float checkpoint's weight would, never the exact block import")
        return line


def open_adapter(path: str | Path, base: GGUFSource | None = None) -> LoraAdapter:
    """A PEFT folder (any base) or a llama.cpp adapter .gguf (`base`: the GGUF model it adapts)."""
    path = Path(path)
    if path.is_dir():
        return read_peft(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        if base is None:
            raise ExportError(f"--lora {path}: a llama.cpp adapter GGUF merges into a GGUF base only; "
                              f"for a Hugging Face base give the PEFT adapter folder")
        return read_gguf_adapter(path, base)
    raise ExportError(f"--lora {path}: expected a PEFT adapter folder with {CONFIG} and {WEIGHTS}, "
                      f"or a llama.cpp LoRA adapter .gguf file")


def read_peft(folder: Path) -> LoraAdapter:
    """peft's save_pretrained folder, names as in the HF checkpoint."""
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise ExportError(f"--lora {folder}: expected a PEFT adapter folder with {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{config_path}: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ExportError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters merge")
    for key, why in _REFUSED.items():
        if config.get(key):
            raise ExportError(f"{config_path}: {key} is set ({why}); not supported by --lora")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ExportError(f"{config_path}: r must be a positive integer and lora_alpha a number")
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    file = _SafetensorsFile(weights_path)  # the checkpoint reader: bf16 adapters too, the header checked
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key in file.entries:
        base = key.removeprefix(_PREFIX)
        for half in ("lora_A", "lora_B"):
            if f".{half}." in base:
                module, _, _ = base.partition(f".{half}.")
                halves.setdefault(f"{module}.weight", {})[half] = file.read(key).astype(np.float32)
                break
        else:
            raise ExportError(f"{weights_path}: tensor {key!r} is not a LoRA A or B matrix; not supported by --lora")
    pairs = {}
    for name, half in halves.items():
        if set(half) != {"lora_A", "lora_B"} or half["lora_A"].shape[0] != half["lora_B"].shape[1]:
            raise ExportError(f"{weights_path}: {name} needs a lora_A (r x in) and a lora_B (out x r)")
        pairs[name] = _Pair(half["lora_A"], half["lora_B"], scale)
    return LoraAdapter(folder, "peft", pairs, float(alpha), sha256_file(weights_path))


def read_gguf_adapter(path: Path, base: GGUFSource) -> LoraAdapter:
    """llama.cpp's adapter GGUF for `base`: its names through the base's name table, B's rows in
    HF order (the q/k permutation convert_lora_to_gguf.py applied to them undone)."""
    from .gguf import _dequantized, hf_name, read_gguf

    reader = read_gguf(path)
    meta = {name: f.contents() for name, f in reader.fields.items()}
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise ExportError(f"--lora {path}: general.type {meta.get('general.type')!r}, adapter.type "
                          f"{meta.get('adapter.type')!r}; expected a LoRA adapter ('adapter', 'lora')")
    arch, base_arch = meta.get("general.architecture"), base.meta.get("general.architecture")
    if arch != base_arch:
        raise ExportError(f"--lora {path}: an adapter for {arch!r}, and {base.path} is {base_arch!r}")
    if "adapter.alora.invocation_tokens" in meta:
        raise ExportError(f"--lora {path}: an activated LoRA (it applies after its invocation tokens only); "
                          f"it cannot be merged into the weights")
    alpha = float(meta.get("adapter.lora.alpha", 0.0))
    halves: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        stem, _, half = tensor.name.rpartition(".")
        if half not in ("lora_a", "lora_b") or len(tensor.shape) != 2:
            raise ExportError(f"--lora {path}: tensor {tensor.name!r} is not a LoRA A or B matrix; "
                              f"not supported by --lora")
        if stem == "token_embd.weight":
            raise ExportError(f"--lora {path}: an embedding adapter ({tensor.name}) is not supported by --lora")
        name = hf_name(stem, base.family.gguf_block)
        if name is None or name not in base.shapes:
            raise ExportError(f"--lora {path}: adapts {stem!r}, which {base.path} does not have "
                              f"(an adapter for another model?)")
        halves.setdefault(name, {})[half] = _dequantized(tensor, path)
    pairs = {}
    for name, half in halves.items():
        if set(half) != {"lora_a", "lora_b"}:
            raise ExportError(f"--lora {path}: {name} has only its {next(iter(half))} (a pair needs lora_a and lora_b)")
        a, b = half["lora_a"], half["lora_b"]
        if a.shape[0] != b.shape[1]:
            raise ExportError(f"--lora {path}: {name}: lora_a {a.shape} and lora_b {b.shape} do not pair "
                              f"(lora_a [r, in], lora_b [out, r])")
        rank = a.shape[0]
        scale = alpha / rank if alpha else 1.0  # llama.cpp's rule: no alpha, no scaling
        pairs[name] = _Pair(a, np.ascontiguousarray(base.family.gguf_rows(name, b, base.spec)), scale)
    return LoraAdapter(path, "gguf", pairs, alpha, sha256_file(path))  # shapes: GGUFSource.attach_lora


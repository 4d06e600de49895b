"""PEFT LoRA adapters merged into a HF checkpoint's weights as they are read, before quantization.

A plant's fine-tune (a LoRA adapter trained on its own tickets) then costs nothing at run time:
the bundle is an ordinary one whose weights are W + (alpha / r) * B @ A. Only what merges
exactly into a linear weight is taken (plain LoRA on Linear layers); DoRA, Conv1D's transposed
layout, per-module ranks and trained extra modules are refused by name rather than merged wrong.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ExportError

from .hf import _SafetensorsFile

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


class LoraAdapter:
    """One adapter folder, read at once (adapters are small): `merge(name, weight)` per tensor."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        config_path, weights_path = self.folder / CONFIG, self.folder / WEIGHTS
        if not config_path.is_file() or not weights_path.is_file():
            raise ExportError(f"--lora {self.folder}: expected a PEFT adapter folder with {CONFIG} and {WEIGHTS}")
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
        self.rank, self.alpha = rank, float(alpha)
        self.scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        self.sha256 = hashlib.sha256(weights_path.read_bytes()).hexdigest()
        self._pairs = self._read(weights_path)

    def _read(self, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Base weight name -> (A, B) in float32."""
        file = _SafetensorsFile(path)  # the checkpoint reader: bf16 adapters too, the header checked
        halves: dict[str, dict[str, np.ndarray]] = {}
        for key in file.entries:
            value = file.read(key)
            base = key.removeprefix(_PREFIX)
            for half in ("lora_A", "lora_B"):
                if f".{half}." in base:
                    module, _, _ = base.partition(f".{half}.")
                    halves.setdefault(f"{module}.weight", {})[half] = value
                    break
            else:
                raise ExportError(f"{path}: tensor {key!r} is not a LoRA A or B matrix; not supported by --lora")
        pairs = {}
        for name, half in halves.items():
            if set(half) != {"lora_A", "lora_B"} or half["lora_A"].shape[0] != half["lora_B"].shape[1]:
                raise ExportError(f"{path}: {name} needs a lora_A (r x in) and a lora_B (out x r)")
            pairs[name] = (half["lora_A"], half["lora_B"])
        if not pairs:
            raise ExportError(f"{path}: no LoRA matrices")
        return pairs

    def check(self, names: list[str], where: Path) -> None:
        """Every adapted weight must be in the base: an adapter for another model is refused."""
        missing = sorted(set(self._pairs) - set(names))
        if missing:
            raise ExportError(f"--lora {self.folder}: adapts {missing[0]!r}, which {where} does not have "
                              f"(an adapter for another model?)")

    def merge(self, name: str, weight: np.ndarray) -> np.ndarray:
        """`weight` (HF layout, out x in) with its adapter's update, in its own dtype."""
        pair = self._pairs.get(name)
        if pair is None:
            return weight
        a, b = pair
        if weight.shape != (b.shape[0], a.shape[1]):
            raise ExportError(f"--lora {self.folder}: {name} is {weight.shape} in the base, "
                              f"{(b.shape[0], a.shape[1])} in the adapter")
        return (weight.astype(np.float32) + self.scale * (b @ a)).astype(weight.dtype)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.folder), "sha256": self.sha256, "r": self.rank, "alpha": self.alpha,
                "weights": len(self._pairs)}

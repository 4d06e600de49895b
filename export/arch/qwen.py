"""Qwen2 (biases on q/k/v) and Qwen3 (RMSNorm on each q/k head): the llama layout otherwise.

llama.cpp's Qwen converters keep HF's rotate-half row order, so GGUF rows need no undoing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm.errors import ExportError
from edgellm.runtime.model_spec import ModelSpec

from .base import Family, GGUFMeta, gguf_rope_scaling, gguf_spec, hf_spec, split_layer


def read_hf(config: dict[str, Any], where: Path) -> ModelSpec:
    arch = config["model_type"]
    if config.get("use_sliding_window"):
        raise ExportError(f"{where}: use_sliding_window=true is not supported for {arch}")
    return hf_spec(config, where, arch, attention_bias=arch == "qwen2" or bool(config.get("attention_bias", False)),
                   qk_norm=arch == "qwen3")


def read_gguf(g: GGUFMeta) -> ModelSpec:
    return gguf_spec(g, g.arch, rope_scaling=gguf_rope_scaling(g))


FAMILY = Family(
    name="qwen",
    archs=("qwen2", "qwen3"),
    hf_types=("qwen2", "qwen3"),
    gguf_archs=("qwen2", "qwen3"),
    read_hf=read_hf,
    read_gguf=read_gguf,
    layer=split_layer,
)

"""Architecture families with a fast graph, one module each; found by HF model_type,
GGUF general.architecture or ModelSpec.arch."""
from __future__ import annotations

from . import gemma3, llama, phi3, qwen
from .base import Family, GGUFMeta, Layer, Rope

FAMILIES: tuple[Family, ...] = (llama.FAMILY, qwen.FAMILY, gemma3.FAMILY, phi3.FAMILY)
FAST_ARCHS: tuple[str, ...] = tuple(a for f in FAMILIES for a in f.hf_types)


def by_hf_type(model_type: object) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.hf_types), None)


def by_gguf_arch(arch: object) -> Family | None:
    return next((f for f in FAMILIES if arch in f.gguf_archs), None)


def by_spec(arch: str) -> Family | None:
    return next((f for f in FAMILIES if arch in f.archs), None)


__all__ = ["FAMILIES", "FAST_ARCHS", "Family", "GGUFMeta", "Layer", "Rope", "by_gguf_arch", "by_hf_type", "by_spec"]

"""Llama and Mistral: pre-norm, SiLU-gated MLP, one rotary cache (llama3 scaling), optional window.

llama.cpp converts Mistral checkpoints under "llama" and permutes q/k rows for its
interleaved rotary; `gguf_rows` undoes that, and llama3 scaling comes back from the
per-dimension divisors it writes as `rope_freqs.weight`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ExportError
from edgellm.runtime.model_spec import ModelSpec

from .base import Family, GGUFMeta, gguf_rope_scaling, gguf_spec, hf_spec, split_layer

ROPE_FREQS = "rope_freqs.weight"


def read_hf(config: dict[str, Any], where: Path) -> ModelSpec:
    arch = config["model_type"]
    sliding = config.get("sliding_window") if arch == "mistral" else None
    return hf_spec(config, where, arch, sliding_window=int(sliding) if sliding else None)


def read_gguf(g: GGUFMeta) -> ModelSpec:
    head_dim = int(g.key("attention.key_length", int(g.key("embedding_length")) // int(g.key("attention.head_count"))))
    theta = float(g.key("rope.freq_base", 10000.0))
    if ROPE_FREQS in g.extras:
        scaling = llama3_scaling(g.extras[ROPE_FREQS], theta, head_dim, f"{g.where}: {ROPE_FREQS}")
    else:
        scaling = gguf_rope_scaling(g)
    return gguf_spec(g, "llama", rope_scaling=scaling)


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: interleaved rotary pairs back to rotate-half.

    Works on any array whose first axis is the output feature (weights, biases, raw
    quantized block rows), since llama.cpp permutes whole rows.
    """
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_rows(name: str, rows: np.ndarray, spec: ModelSpec) -> np.ndarray:
    if ".self_attn.q_proj." in name:
        return unpermute_rows(rows, spec.num_heads)
    if ".self_attn.k_proj." in name:
        return unpermute_rows(rows, spec.num_kv_heads)
    return rows


def llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, where: str = ROPE_FREQS) -> dict[str, Any] | None:
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


FAMILY = Family(
    name="llama",
    archs=("llama", "mistral"),
    hf_types=("llama", "mistral"),
    gguf_archs=("llama",),
    read_hf=read_hf,
    read_gguf=read_gguf,
    layer=split_layer,
    gguf_rows=gguf_rows,
    gguf_extras=(ROPE_FREQS,),
)

"""Phi-3, Phi-3.5-mini and Phi-4-mini (`Phi3ForCausalLM`): the llama layout with fused
projections (qkv_proj rows [q|k|v], gate_up_proj rows [gate|up]), partial rotary
(Phi-4-mini turns 3/4 of each head) and longrope ("su") scaling.

longrope divides the rotary frequencies by `short_factor` up to
original_max_position_embeddings and by `long_factor` beyond, with cos/sin scaled by
sqrt(1 + ln(s) / ln(original)). Past the original context transformers drops the KV cache
and recomputes every position with the long factors; a cache that keeps its rows cannot do
that, so the bundle's context is capped at original_max_position_embeddings (4096 for the
Phi-3.5/4 minis), where the short factors give transformers' numbers exactly.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgellm.errors import ExportError
from edgellm.runtime.model_spec import ModelSpec

from .base import GGUF_BLOCK, Family, GGUFMeta, Layer, gguf_rope_scaling, gguf_spec, hf_spec, split_layer

LONG, SHORT = "rope_factors_long.weight", "rope_factors_short.weight"


def _longrope(short: list[float], long: list[float], original: int, context: int,
              attention_factor: float | None) -> dict[str, Any]:
    factor = context / original
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", "short_factor": [float(f) for f in short], "long_factor": [float(f) for f in long],
            "original_max_position_embeddings": original, "attention_factor": float(attention_factor)}


def read_hf(config: dict[str, Any], where: Path) -> ModelSpec:
    if config.get("hidden_act", "silu") != "silu":
        raise ExportError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (supported: silu)")
    context = int(config.get("max_position_embeddings", 4096))
    fields: dict[str, Any] = {}
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("longrope", "su"):
            raise ExportError(f"{where}: rope_scaling type {kind!r} is not supported for phi3 "
                              "(supported: longrope, su)")
        original = int(config.get("original_max_position_embeddings") or context)
        fields["rope_scaling"] = _longrope(scaling["short_factor"], scaling["long_factor"], original, context,
                                           scaling.get("attention_factor"))
        fields["max_context"] = min(context, original)
    window = config.get("sliding_window")
    return hf_spec({**config, "rope_scaling": None}, where, "phi3",
                   partial_rotary_factor=float(config.get("partial_rotary_factor", 1.0)),
                   sliding_window=int(window) if window else None, **fields)


def read_gguf(g: GGUFMeta) -> ModelSpec:
    context = int(g.key("context_length"))
    fields: dict[str, Any] = {}
    if SHORT in g.extras:
        original = int(g.key("rope.scaling.original_context_length", context))
        fields["rope_scaling"] = _longrope(g.extras[SHORT].reshape(-1).tolist(), g.extras[LONG].reshape(-1).tolist(),
                                           original, context, g.key("rope.scaling.attn_factor", None))
        fields["max_context"] = min(context, original)
    else:
        fields["rope_scaling"] = gguf_rope_scaling(g)
    return gguf_spec(g, "phi3", **fields)


def layer(spec: ModelSpec, i: int) -> Layer:
    hf = f"model.layers.{i}"
    return split_layer(spec, i, qkv=(f"{hf}.self_attn.qkv_proj",), gate_up=(f"{hf}.mlp.gate_up_proj",))


FAMILY = Family(
    name="phi3",
    archs=("phi3",),
    hf_types=("phi3",),
    gguf_archs=("phi3",),
    read_hf=read_hf,
    read_gguf=read_gguf,
    layer=layer,
    gguf_block={**GGUF_BLOCK, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    gguf_extras=(LONG, SHORT),
)

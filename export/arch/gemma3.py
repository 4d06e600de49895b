"""Gemma 3 text: sandwich norms, GELU-tanh, scaled embeddings, local and global attention layers.

What transformers and llama.cpp agree on: RMSNorm is x·(1+w) (HF stores w, llama.cpp's
converter stores 1+w, so HF norms get the +1 here and GGUF's are used as they are);
embeddings are multiplied by sqrt(hidden); q and k are RMS-normed per head before rotary;
sliding layers use a window and rope_local_base_freq without scaling, full ones rope_theta
with rope_scaling; the softmax scale is query_pre_attn_scalar ** -0.5. GGUF stores neither
the layer pattern, the local base nor the scalar: llama.cpp fixes them (every 6th layer
global, base 10,000, scalar head_dim except the 27B's hidden/heads), and so does this reader.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ExportError
from edgellm.runtime.model_spec import ModelSpec

from .base import GGUF_BLOCK, Family, GGUFMeta, Layer, Rope, gguf_rope_scaling, gguf_spec, hf_spec, split_layer

SLIDING, FULL = "sliding_attention", "full_attention"
PATTERN = 6  # llama.cpp's and transformers' default: layers 6, 12, ... are global
LOCAL_THETA = 10000.0
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _pattern(num_layers: int, every: int = PATTERN) -> list[str]:
    return [SLIDING if (i + 1) % every else FULL for i in range(num_layers)]


# Gemma3TextConfig's defaults: Gemma3ForConditionalGeneration configs leave them out of text_config.
_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072, rms_norm_eps=1e-6,
    rope_theta=1_000_000.0, query_pre_attn_scalar=256, sliding_window=4096, rope_local_base_freq=LOCAL_THETA,
    hidden_activation="gelu_pytorch_tanh",
)


def read_hf(config: dict[str, Any], where: Path) -> ModelSpec:
    text = config.get("text_config", {}) if config.get("model_type") == "gemma3" else config
    if not isinstance(text, dict):
        raise ExportError(f"{where}: text_config is not an object")
    text = {**_DEFAULTS, **text, "tie_word_embeddings": config.get("tie_word_embeddings", True)}
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if text.get(key) is not None:
            raise ExportError(f"{where}: {key}={text[key]} is not supported (Gemma 3 has none)")
    if text.get("use_bidirectional_attention"):
        raise ExportError(f"{where}: use_bidirectional_attention=true is not supported (a decoder attends causally)")
    if text["hidden_activation"] != "gelu_pytorch_tanh":
        raise ExportError(f"{where}: hidden_activation {text['hidden_activation']!r} is not supported "
                          "(supported: gelu_pytorch_tanh)")
    layers = int(text["num_hidden_layers"])
    layer_types = text.get("layer_types") or _pattern(layers, int(text.get("sliding_window_pattern", PATTERN)))
    if len(layer_types) != layers or set(layer_types) - {SLIDING, FULL}:
        raise ExportError(f"{where}: layer_types must be {SLIDING!r} or {FULL!r} for each of {layers} layers")
    return hf_spec(
        text, where, "gemma3",
        layer_types=list(layer_types),
        sliding_window=int(text["sliding_window"]),
        rope_local_theta=float(text["rope_local_base_freq"]),
        attention_scale=float(text["query_pre_attn_scalar"]) ** -0.5,
        embedding_scale=_embedding_scale(int(text["hidden_size"])),
        qk_norm=True,
        activation="gelu_tanh",
    )


def _embedding_scale(hidden: int) -> float:
    """sqrt(hidden) as transformers holds it (a float32 tensor) and llama.cpp computes it."""
    return float(np.float32(math.sqrt(hidden)))


def read_gguf(g: GGUFMeta) -> ModelSpec:
    layers = int(g.key("block_count"))
    hidden = int(g.key("embedding_length"))
    heads = g.key("attention.head_count")
    head_dim = int(g.key("attention.key_length", hidden // int(heads)))
    window = g.key("attention.sliding_window", None)
    if window is None:
        raise ExportError(f"{g.where}: metadata gemma3.attention.sliding_window is missing")
    scalar = hidden // int(heads) if layers == 62 else head_dim  # llama.cpp: the 27B alone differs
    return gguf_spec(
        g, "gemma3",
        rope_theta=float(g.key("rope.freq_base", 1_000_000.0)),
        rope_scaling=gguf_rope_scaling(g),
        layer_types=_pattern(layers),
        rope_local_theta=LOCAL_THETA,
        attention_scale=float(scalar) ** -0.5,
        embedding_scale=_embedding_scale(hidden),
        rms_norm_eps=float(g.key("attention.layer_norm_rms_epsilon", 1e-6)),
        activation="gelu_tanh",
    )


def layer(spec: ModelSpec, i: int) -> Layer:
    hf = f"model.layers.{i}"
    sliding = (spec.layer_types or _pattern(spec.num_layers))[i] == SLIDING
    local = Rope("local", spec.rope_local_theta or LOCAL_THETA)
    return split_layer(
        spec, i,
        attn_post_norm=f"{hf}.post_attention_layernorm",
        ffn_norm=f"{hf}.pre_feedforward_layernorm",
        ffn_post_norm=f"{hf}.post_feedforward_layernorm",
        window=spec.sliding_window if sliding else None,
        rope=local if sliding else Rope("", spec.rope_theta, spec.rope_scaling),
        scale=spec.attention_scale,
        activation=spec.activation,
    )


def hf_tensor(name: str, array: np.ndarray) -> np.ndarray:
    """HF Gemma norms hold w for x·(1+w); the graph's RMSNorm multiplies by its weight."""
    return array + np.float32(1.0) if name.endswith("norm.weight") else array


FAMILY = Family(
    name="gemma3",
    archs=("gemma3",),
    hf_types=("gemma3_text", "gemma3"),
    gguf_archs=("gemma3",),
    read_hf=read_hf,
    read_gguf=read_gguf,
    layer=layer,
    gguf_block={
        **GGUF_BLOCK,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    hf_tensor=hf_tensor,
    chat_template=CHAT_TEMPLATE,
)

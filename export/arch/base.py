"""What an architecture family module provides, and the config readers the families share.

A family says three things: how its HF config.json and GGUF metadata become a `ModelSpec`,
what its GGUF tensors are called in HF terms, and what each decoder layer is made of
(`Layer`). The graph blocks in graph.py build whatever a `Layer` describes, so a new family
is one module here and its tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgellm.errors import ExportError
from edgellm.runtime.model_spec import ModelSpec

# Rotary scaling the graph computes (graph.rope_caches); one list for every reader.
ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "longrope")

# GGUF block tensor stems (blk.N.<stem>) most families share, and their HF modules.
GGUF_BLOCK = {
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


@dataclass(frozen=True)
class Rope:
    """One rotary cache: GroupQueryAttention takes the rotary width from the cache's."""

    name: str  # initializer suffix: "" for the model's main cache
    theta: float
    scaling: dict[str, Any] | None = None


@dataclass(frozen=True)
class Layer:
    """One decoder layer in HF tensor names (without `.weight`), and what families vary."""

    qkv: tuple[str, ...]  # fused into one projection, rows [q|k|v]
    o: str
    gate_up: tuple[str, ...]  # fused into one projection, rows [gate|up]
    down: str
    attn_norm: str  # before attention
    ffn_norm: str  # before the MLP
    attn_post_norm: str | None = None  # "sandwich" norms, on a block's output before the residual add
    ffn_post_norm: str | None = None
    qkv_bias: bool = False
    q_norm: str | None = None  # RMSNorm over each q / k head, before rotary
    k_norm: str | None = None
    window: int | None = None  # attend to the last `window` positions, the current one included
    rope: Rope = field(default_factory=lambda: Rope("", 10000.0))
    scale: float | None = None  # attention scale; None: 1/sqrt(head_dim)
    activation: str = "silu"  # or "gelu_tanh"


def split_layer(spec: ModelSpec, i: int, **options: Any) -> Layer:
    """The llama layout: separate q/k/v and gate/up projections, pre-norms; q/k/v biases,
    q/k norms and a window as the spec says; `options` override any field."""
    hf = f"model.layers.{i}"
    fields: dict[str, Any] = dict(
        qkv=tuple(f"{hf}.self_attn.{p}_proj" for p in "qkv"),
        o=f"{hf}.self_attn.o_proj",
        gate_up=(f"{hf}.mlp.gate_proj", f"{hf}.mlp.up_proj"),
        down=f"{hf}.mlp.down_proj",
        attn_norm=f"{hf}.input_layernorm",
        ffn_norm=f"{hf}.post_attention_layernorm",
        qkv_bias=spec.attention_bias,
        window=spec.sliding_window,
        rope=Rope("", spec.rope_theta, spec.rope_scaling),
    )
    if spec.qk_norm:
        fields.update(q_norm=f"{hf}.self_attn.q_norm", k_norm=f"{hf}.self_attn.k_norm")
    return Layer(**{**fields, **options})


def _same(name: str, array: np.ndarray) -> np.ndarray:
    return array


@dataclass(frozen=True)
class GGUFMeta:
    """What a GGUF family reader sees: metadata, tensor shapes by HF name, extra tensors."""

    arch: str  # general.architecture
    meta: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]  # HF name -> [out, in] shape
    extras: dict[str, np.ndarray]  # dequantized tensors that are metadata (rope_freqs, rope factors)
    where: str

    def key(self, name: str, default: Any = ...) -> Any:
        value = self.meta.get(f"{self.arch}.{name}", default)
        if value is ...:
            raise ExportError(f"{self.where}: metadata {self.arch}.{name} is missing")
        return value


@dataclass(frozen=True)
class Family:
    """One architecture family: its readers, its GGUF names and its layer composition."""

    name: str
    archs: tuple[str, ...]  # ModelSpec.arch values it builds
    hf_types: tuple[str, ...]  # config.json model_type values
    gguf_archs: tuple[str, ...]  # general.architecture values
    read_hf: Callable[[dict[str, Any], Path], ModelSpec]
    read_gguf: Callable[[GGUFMeta], ModelSpec]
    layer: Callable[[ModelSpec, int], Layer]
    gguf_block: dict[str, str] = field(default_factory=lambda: dict(GGUF_BLOCK))
    # HF tensors as the graph wants them (Gemma stores norms as w - 1).
    hf_tensor: Callable[[str, np.ndarray], np.ndarray] = _same
    # GGUF tensors (or their raw block rows) back in HF order (llama.cpp permutes llama's q/k).
    gguf_rows: Callable[[str, np.ndarray, ModelSpec], np.ndarray] = lambda name, rows, spec: rows
    # GGUF tensors that carry metadata rather than weights, read into GGUFMeta.extras.
    gguf_extras: tuple[str, ...] = ()
    # Used when a GGUF carries no chat template.
    chat_template: str | None = None


def rope_scaling(config: dict[str, Any], where: Path) -> dict[str, Any] | None:
    """HF rope_scaling with its type under "rope_type"; ExportError for types the graph cannot build."""
    scaling = config.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ExportError(f"{where}: rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    return {**scaling, "rope_type": kind}


def hf_spec(config: dict[str, Any], where: Path, arch: str, **fields: Any) -> ModelSpec:
    """ModelSpec from the config.json fields every fast family shares; `fields` add or override."""
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        base = dict(
            arch=arch,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            max_context=int(config.get("max_position_embeddings", 2048)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling(config, where),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
        )
        return ModelSpec(**{**base, **fields})
    except KeyError as exc:
        raise ExportError(f"{where}: field {exc.args[0]!r} is missing") from None
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{where}: invalid value ({exc})") from None


def gguf_rope_scaling(g: GGUFMeta) -> dict[str, Any] | None:
    """HF rope_scaling from `{arch}.rope.scaling.*`; ExportError for types the graph cannot build."""
    kind = g.key("rope.scaling.type", "none")
    factor = g.key("rope.scaling.factor", None)
    if kind == "none" or factor is None or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise ExportError(f"{g.where}: {g.arch}.rope.scaling.type {kind!r} is not supported (supported: none, linear)")


def per_layer(value: Any, where: str) -> int:
    """llama.cpp may store head counts per layer; the graph needs them uniform."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ExportError(f"{where} differs between layers ({sorted(set(value))})")
        value = value[0]
    return int(value)


def gguf_spec(g: GGUFMeta, arch: str, **fields: Any) -> ModelSpec:
    """ModelSpec from the llama.cpp metadata every fast family shares; tensors settle tying,
    biases and q/k norms; `fields` add or override."""
    hidden = int(g.key("embedding_length"))
    heads_key = f"{g.where}: {g.arch}.attention.head_count"
    num_heads = per_layer(g.key("attention.head_count"), heads_key)
    num_kv_heads = per_layer(g.key("attention.head_count_kv", num_heads), f"{heads_key}_kv")
    tokens = g.meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ExportError(f"{g.where}: metadata tokenizer.ggml.tokens is missing")
    embed = g.shapes.get("model.embed_tokens.weight")
    if embed is None:
        raise ExportError(f"{g.where}: tensor token_embd.weight is missing")
    if embed[0] != len(tokens):
        raise ExportError(f"{g.where}: token_embd.weight has {embed[0]} rows for {len(tokens)} tokens")
    window = g.key("attention.sliding_window", None)
    head_dim = int(g.key("attention.key_length", hidden // num_heads))
    base = dict(
        arch=arch,
        num_layers=int(g.key("block_count")),
        hidden_size=hidden,
        intermediate_size=int(g.key("feed_forward_length")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        partial_rotary_factor=int(g.key("rope.dimension_count", head_dim)) / head_dim,
        vocab_size=len(tokens),
        max_context=int(g.key("context_length")),
        rope_theta=float(g.key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g.key("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="lm_head.weight" not in g.shapes,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in g.shapes,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in g.shapes,
        sliding_window=int(window) if window else None,  # llama.cpp writes 0 for none
    )
    try:
        return ModelSpec(**{**base, **fields})
    except ValueError as exc:
        raise ExportError(f"{g.where}: {exc}") from None

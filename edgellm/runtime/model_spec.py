"""What a bundle's graph computes: architecture and shapes, stored in the manifest.

Export fills it from a source (HF config.json or GGUF metadata); the runtime reads
it to size the KV cache and to know which inputs the graph takes. One definition,
so the two never disagree.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    rope_theta: float = 10000.0
    # HF-style rope_scaling dict ({"rope_type": "llama3", "factor": ...}) or None.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # qwen2: bias on q/k/v projections
    qk_norm: bool = False  # qwen3: RMSNorm on each q/k head before rotary
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # What families beyond llama vary (export/arch/); the defaults are llama's, so bundles
    # written before these fields existed still load.
    partial_rotary_factor: float = 1.0  # share of each head's dims that rotary turns (Phi-4-mini 0.75)
    # Per layer "sliding_attention" (window `sliding_window`) or "full_attention" (Gemma 3).
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # rotary base of sliding layers, unscaled (Gemma 3)
    attention_scale: float | None = None  # softmax scale; None: 1/sqrt(head_dim)
    embedding_scale: float | None = None  # embeddings are multiplied by it (Gemma: sqrt(hidden))
    activation: str = "silu"  # gated MLP activation: "silu" or "gelu_tanh"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model spec fields: {sorted(unknown)}")
        return cls(**data)

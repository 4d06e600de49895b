"""Small value types shared by the export paths (fast builder and optimum)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edgellm.errors import ExportError
from edgellm.runtime.bundle import Graph

WeightType = Literal["int4", "int8", "fp16", "fp32"]
KVCacheType = Literal["auto", "float32", "float16", "int8"]
Target = Literal["cpu", "cuda", "openvino", "qnn"]
TARGETS = ("cpu", "cuda", "openvino", "qnn")
# A bundle's context unless --max-context says: the largest any device profile runs
# (devices/*.toml), so rotary tables do not hold the 32k or 128k positions no board reaches.
DEFAULT_MAX_CONTEXT = 8192


@dataclass(frozen=True)
class QuantConfig:
    """How weights, activations and the KV cache are stored. int4/int8 use onnxruntime's MatMulNBits layout."""

    weights: WeightType = "int4"
    block_size: int = 32
    symmetric: bool = True
    # MatMulNBits accuracy_level: 4 = int8 activations on CPU (fast), 0 = float activations.
    # None: 4 for the cpu target, 0 for cuda and openvino (see __post_init__).
    accuracy_level: int | None = None
    # int8: a quarter of the float32 cache's memory, per-channel scales calibrated at export.
    # auto: int8 where the graph already rounds activations to int8 (see resolved_kv_cache).
    kv_cache: KVCacheType = "auto"
    # cpu: float32 activations. cuda: float16 activations, norms, attention and KV cache, the
    # dtype onnxruntime's CUDA kernels run. openvino: attention and rotary from standard ops
    # (OpenVINO fuses them; it has no GroupQueryAttention), a sequence-major float32 cache.
    # The graph's `target` records it (not to_dict, so cpu manifests stay as they were).
    target: Target = "cpu"
    # qnn: the rows of the KV cache, fixed at export (every step attends over all of them); None: 256.
    context: int | None = None
    # Bits of lm_head (and the embedding it shares when tied); None: as the other weights. A GGUF
    # head of a wider type (Q8_0, Q6_K) is rounded afresh: 4 saves about 20% of the bytes a token
    # reads at 0.5B, at whatever the quality gate then measures.
    head_bits: int | None = None

    def __post_init__(self) -> None:
        if self.weights not in ("int4", "int8", "fp16", "fp32"):
            raise ExportError(f"--quant {self.weights!r}: expected int4, int8, fp16 or fp32")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ExportError(f"--block-size {self.block_size}: expected 16, 32, 64, 128 or 256")
        if self.kv_cache not in ("auto", "float32", "float16", "int8"):
            raise ExportError(f"--kv-cache {self.kv_cache!r}: expected auto, float32, float16 or int8")
        if self.target not in TARGETS:
            raise ExportError(f"--target {self.target!r}: expected {' or '.join(TARGETS)}")
        if self.target == "cuda" and self.weights == "fp32":
            raise ExportError("--quant fp32 --target cuda: float16 activations take fp16, int8 or int4 weights")
        if self.head_bits is not None and self.head_bits not in (4, 8):
            raise ExportError(f"--head-bits {self.head_bits}: expected 4 or 8")
        if self.head_bits is not None and self.weights not in ("int4", "int8"):
            raise ExportError(f"--head-bits {self.head_bits} --quant {self.weights}: only int4/int8 weights have "
                              "bits to choose")
        if self.context is not None and self.target != "qnn":
            raise ExportError(f"--context {self.context}: only --target qnn fixes the context at export")
        if self.target == "qnn" and self.context is None:
            object.__setattr__(self, "context", 256)
        if self.accuracy_level is None:
            # OpenVINO multiplies float activations by the int4 weights whatever the level says (tiny
            # llama: 1.5e-6 of the logit scale from the CPU provider at level 0, 2.8e-2 at level 4), so
            # level 0 makes the CPU provider, which runs the quality gate, compute what OpenVINO does.
            object.__setattr__(self, "accuracy_level", 4 if self.target == "cpu" else 0)
        if self.target == "cuda" and self.accuracy_level != 0:
            # CUDA's MatMulNBits has no accuracy_level: it multiplies float16 activations by float16
            # weights. Level 0 makes the CPU provider (the quality gate) compute the same.
            raise ExportError(f"--accuracy-level {self.accuracy_level} --target cuda: onnxruntime's CUDA MatMulNBits "
                              "reads no accuracy level; use 0 (the default for cuda)")

    @property
    def activation_dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.target == "cuda" else np.float32)

    def resolved_kv_cache(self, fast_graph: bool) -> Literal["float32", "float16", "int8"]:
        """What `auto` means: int8 for quantized weights at int8 activations on the fast graph.

        Such a graph already rounds activations to int8, and on SmolLM2 the int8 cache
        measured no worse (perplexity 0.997x vs 1.006x) while a 2,000-token context
        takes 23 MB instead of 92. fp32/fp16 weights and accuracy_level 0 ask for
        exactness; the optimum graph has no quantized cache, so asking it for one is an error.
        The cuda target's cache is float16, the dtype its GroupQueryAttention reads.
        """
        if self.target == "cuda":
            if not fast_graph:
                raise ExportError("--target cuda: the optimum path has no float16 graph (fast graph only)")
            if self.kv_cache not in ("auto", "float16"):
                raise ExportError(f"--kv-cache {self.kv_cache} --target cuda: the cache is float16, "
                                  "the dtype of the graph's attention")
            return "float16"
        if self.kv_cache == "float16":
            raise ExportError(f"--kv-cache float16: needs --target cuda (the {self.target} graph attends in float32)")
        if self.target in ("openvino", "qnn"):
            if not fast_graph:
                raise ExportError(f"--target {self.target}: the optimum path has no such graph (fast graph only)")
            if self.kv_cache == "int8":
                # GroupQueryAttention quantizes the cache; the standard-op attention has no quantized cache.
                raise ExportError(f"--kv-cache int8 --target {self.target}: the cache is float32 (no GroupQueryAttention)")
            return "float32"
        if self.kv_cache == "int8" and not fast_graph:
            raise ExportError("--kv-cache int8: the optimum path has no quantized KV cache (fast graph only)")
        if self.kv_cache != "auto":
            return self.kv_cache
        lossy = self.weights in ("int4", "int8") and self.accuracy_level != 0
        return "int8" if fast_graph and lossy else "float32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "block_size": self.block_size if self.weights in ("int4", "int8") else None,
            "symmetric": self.symmetric,
            "accuracy_level": self.accuracy_level,
            "kv_cache": self.kv_cache,
        } | ({} if self.head_bits is None else {"head_bits": self.head_bits})


@dataclass
class GraphInfo:
    """What an export path wrote: the manifest's `graph` section plus notes for the log."""

    kind: Literal["fast", "generic"]
    file: str  # relative to the bundle root, e.g. "model.onnx"
    inputs: list[str]
    outputs: list[str]
    kv_dtype: str = "float32"
    # Inputs, outputs and KV buffers have a symbolic first dimension: cache slots decode together.
    # Bundles without the field were exported batch-1.
    batch: bool = False
    # What the graph's dtypes were chosen for (QuantConfig.target); bundles without the field target cpu.
    target: Target = "cpu"
    # qnn: the KV cache's rows, fixed in the graph's shapes.
    context: int | None = None
    # Per-tensor quantization notes (e.g. "exact Q4_1 import", "re-quantized from Q6_K").
    notes: list[str] = field(default_factory=list)
    # The freshly rounded weights that lost the most, worst first: the quality gate's message.
    worst_weights: list[str] = field(default_factory=list)
    # GGUF types imported in another block than their own, with what that cost ("Q6_K re-rounded ...").
    reblocked: list[str] = field(default_factory=list)
    # Some int4/int8 matmul reads appended activation block sums (folded GGUF offsets).
    block_sums: bool = False

    def graph(self) -> Graph:
        """The manifest's `graph` section for what was written, checked as a bundle's is read
        (Graph.to_dict is the one place the section is spelled out)."""
        written = Graph(kind=self.kind, file=self.file, inputs=tuple(self.inputs), outputs=tuple(self.outputs),
                        target=self.target, kv_dtype=self.kv_dtype, batch=self.batch, context=self.context,
                        block_sums=self.block_sums)
        return Graph.from_dict(written.to_dict())

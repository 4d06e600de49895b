"""The fast graph: one fused ONNX decoder (GroupQueryAttention, MatMulNBits, fused norms).

Laid out like onnxruntime-genai's CPU graphs, about 11 nodes per layer:

    [Skip]SimplifiedLayerNorm -> QKV MatMulNBits -> GroupQueryAttention (rotary inside)
    -> o MatMulNBits -> SkipSimplifiedLayerNorm -> gate;up MatMulNBits -> SiLU*up -> down MatMulNBits

The KV cache is one preallocated buffer per layer and tensor, bound as both
`past_key_values.{i}.*` and `present.{i}.*`: GroupQueryAttention writes the new
rows in place when the two share memory, so decoding never copies the cache.
Initializers are written to `model.onnx.data` as soon as they are built, so the
export holds one layer's weights at a time, not the whole model twice.

Linear layers (and the per-block offsets of GGUF types with a minimum) are laid out by linear.py.

`QuantConfig.target` "cuda" builds the same nodes with float16 activations, norm
weights, block scales, rotary caches and KV cache, the dtype onnxruntime's CUDA
kernels take; the norms still accumulate in float32 inside the op, and logits are
cast to float32 so sampling and the quality gate read what a cpu graph gives them.
"openvino" swaps GroupQueryAttention for standard ops and lays the cache out
sequence-major (openvino.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellm.errors import ExportError
from edgellm.runtime.model_spec import ModelSpec

from . import arch, openvino
from .arch import Layer, Rope
from .arch.base import ROPE_TYPES
from .config import GraphInfo, QuantConfig
from .linear import Linear, Writer, apply_linear, gathered_codes, make_linear, quantized_linear, weight_bits
from .quantize import QuantizedWeight, offset_width
from .sources import Source
from .weights import WeightLoader

GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 21  # onnxruntime >= 1.20, the oldest the runtime supports
IR_VERSION = 10
_INT64_MAX = np.iinfo(np.int64).max

Progress = Callable[[str, int, int], None]
# (writer, name, x, residual, gamma, eps) -> (normed, new residual): add_norm, or a target's own.
Norm = Callable[[Writer, str, str, "str | None", np.ndarray, float], tuple[str, str]]


# --- rotary ------------------------------------------------------------------


def rope_caches(spec: ModelSpec, rope: Rope | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_context, rotary_dim/2] for GroupQueryAttention, HF's frequencies.

    `rope` picks the base and scaling (default: the spec's); the rotary width is the
    spec's partial_rotary_factor of head_dim, and GroupQueryAttention reads it from the cache.
    """
    rope = rope or Rope("", spec.rope_theta, spec.rope_scaling)
    dim = int(spec.head_dim * spec.partial_rotary_factor)
    if dim % 16 or dim > spec.head_dim:
        raise ExportError(f"partial_rotary_factor {spec.partial_rotary_factor} of head_dim {spec.head_dim} rotates "
                          f"{dim} dims; GroupQueryAttention needs a multiple of 16 up to head_dim")
    # Frequencies in float32 as HF computes them; angles in float64 so late positions stay exact.
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.float32(rope.theta) ** exponents).astype(np.float32)
    scaling = rope.scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    magnitude = 1.0
    # dynamic NTK changes frequencies only past max_position_embeddings, which is
    # max_context here, so within the cache's range it is the default.
    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "longrope":
        inv_freq, magnitude = _longrope(inv_freq, scaling, spec)
    elif kind not in ("default", "dynamic"):
        raise ExportError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    angles = np.outer(np.arange(spec.max_context, dtype=np.float64), inv_freq.astype(np.float64))
    return (np.cos(angles) * magnitude).astype(np.float32), (np.sin(angles) * magnitude).astype(np.float32)


def _llama3_inv_freq(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _longrope(inv_freq: np.ndarray, s: dict, spec: ModelSpec) -> tuple[np.ndarray, float]:
    """Phi-3's longrope within original_max_position_embeddings (the family caps max_context
    there): short factors divide the frequencies; cos/sin carry the attention factor."""
    factors = np.asarray(s["short_factor"], dtype=np.float32)
    if factors.shape != inv_freq.shape:
        raise ExportError(f"rope_scaling short_factor: {factors.size} factors for {inv_freq.size} rotary frequencies")
    return (inv_freq / factors).astype(np.float32), float(s["attention_factor"])


# --- blocks ------------------------------------------------------------------


def attention_lengths(w: Writer) -> tuple[str, str]:
    """seqlens_k (T-1, int32 [1]) and total_sequence_length (T, int32 scalar) from the mask."""
    base = "/model/attn_mask"
    total = w.one("ReduceSum", f"{base}/ReduceSum", ["attention_mask", w.const([1])], keepdims=0)
    past = w.one("Sub", f"{base}/Sub", [total, w.const([1])])
    seqlens = w.one("Cast", f"{base}/Sub/Cast", [past], to=TensorProto.INT32)
    shape = w.one("Shape", f"{base}/Shape", ["attention_mask"])
    length = w.one("Gather", f"{base}/Gather", [shape, w.const(1)], axis=0)
    return seqlens, w.one("Cast", f"{base}/Gather/Cast", [length], to=TensorProto.INT32)


def add_norm(w: Writer, name: str, x: str, residual: str | None, gamma: np.ndarray, eps: float) -> tuple[str, str]:
    """RMSNorm(x + residual), fusing the residual add; returns (normed, new residual)."""
    scale = w.floats(f"{name}.weight", gamma)
    if residual is None:
        normed = w.one("SimplifiedLayerNormalization", f"{name}/SimplifiedLayerNorm", [x, scale], axis=-1, epsilon=eps)
        return normed, x
    out = f"{name}/SkipLayerNorm"
    normed, _, _, total = w.node(
        "SkipSimplifiedLayerNormalization",
        out,
        [x, residual, scale],
        [f"{out}/output_0", "", "", f"{out}/output_3"],
        epsilon=eps,
    )
    return normed, total


def embed(
    w: Writer,
    source: Source,
    spec: ModelSpec,
    quant: QuantConfig,
    loader: WeightLoader | None,
    head: Linear,
    head_q: QuantizedWeight | None,
) -> str:
    """input_ids -> hidden states, from lm_head's weight when tied (one copy of the table),
    else from the embedding's own."""
    name = "/model/embed_tokens"
    if loader is None:
        dtype = np.float16 if quant.weights == "fp16" else np.float32
        if spec.tie_embeddings:
            # lm_head holds E^T; onnxruntime folds this Transpose once at load.
            table = w.one("Transpose", f"{name}/Transpose", [head.weight], perm=[1, 0])
        else:
            table = w.initializer("model.embed_tokens.weight", source.tensor("model.embed_tokens.weight").astype(dtype))
        hidden = w.one("Gather", f"{name}/Gather", [table, "input_ids"], axis=0)
        return w.one("Cast", f"{name}/Cast", [hidden], to=w.float_proto) if dtype != w.float_type else hidden
    q = head_q if head_q is not None else loader.load(["model.embed_tokens.weight"])[0]
    if quant.target == "openvino":
        return openvino.embed_quantized(w, spec, q, head.weight if head_q is not None and not head.folded else None)
    # Tied: lm_head's own initializers, so the table is stored once; rows come back at
    # the ones gathered (onnxruntime releases no mapped page of a weight another node reads).
    lin = head if head_q is not None else quantized_linear(w, "model.embed_tokens", q, None, quant, matmul=False)
    return gather_rows(w, name, spec, q, lin)


def gather_rows(w: Writer, name: str, spec: ModelSpec, q: QuantizedWeight, lin: Linear) -> str:
    """input_ids -> the rows of `lin`'s weight as floats [b, s, hidden]: Gather the packed rows
    and their scales (and zero points, offsets) and compute (code - zero) * scale + offset.

    Plain Gathers of MatMulNBits' own initializers: GatherBlockQuantized wants scales of
    another shape ([N, blocks, 1]), a second copy, or a Reshape onnxruntime folds into one."""
    blocks = q.n_blocks + lin.folded // q.block_size  # folded offsets ride as more blocks
    packed = w.one("Gather", f"{name}/Gather", [lin.weight, "input_ids"], axis=0)  # [b, s, blocks, blob]
    codes = gathered_codes(w, name, packed, q.bits, [0, 0, blocks, q.block_size])
    if lin.zero_points:
        zeros = w.one("Gather", f"{name}/zero_points/Gather", [lin.zero_points, "input_ids"], axis=0)
        zeros = gathered_codes(w, f"{name}/zero_points", zeros, q.bits, [0, 0, -1])
        zeros = w.one("Slice", f"{name}/zero_points/Slice", [zeros, w.const([0]), w.const([blocks]), w.const([-1])])
        centre = w.one("Unsqueeze", f"{name}/zero_points/centre", [zeros, w.const([-1])])
    else:
        centre = w.fconst(float(1 << (q.bits - 1)))
    scales = w.one("Gather", f"{name}/scales/Gather", [lin.scales, "input_ids"], axis=0)
    scales = w.one("Unsqueeze", f"{name}/scales/Unsqueeze", [scales, w.const([-1])])
    centred = w.one("Sub", f"{name}/dequantize/Sub", [codes, centre])
    values = w.one("Mul", f"{name}/dequantize/Mul", [centred, scales])  # [b, s, blocks, bs]
    offsets = ""
    if lin.folded:  # the digits' blocks sum to each block's offset (quantize.offset_blocks)
        digits = w.one("Slice", f"{name}/offsets/Slice", [values, w.const([q.n_blocks]), w.const([blocks]),
                                                           w.const([2])])
        width = offset_width(q.n_blocks, q.block_size)
        digits = w.one("Reshape", f"{name}/offsets/Reshape", [digits, w.const([0, 0, -1, width])])
        summed = w.one("ReduceSum", f"{name}/offsets/ReduceSum", [digits, w.const([2])], keepdims=0)
        offsets = w.one("Slice", f"{name}/offsets/Slice_1", [summed, w.const([0]), w.const([q.n_blocks]),
                                                             w.const([2])])
        values = w.one("Slice", f"{name}/Slice_blocks", [values, w.const([0]), w.const([q.n_blocks]), w.const([2])])
    elif lin.offsets:  # a float [n_blocks, N] table
        offsets = w.one("Gather", f"{name}/offsets/Gather", [lin.offsets, "input_ids"], axis=1)  # [n_blocks, b, s]
        offsets = w.one("Transpose", f"{name}/offsets/Transpose", [offsets], perm=[1, 2, 0])
    if offsets:
        offsets = w.one("Unsqueeze", f"{name}/offsets/Unsqueeze", [offsets, w.const([-1])])
        values = w.one("Add", f"{name}/offsets/Add", [values, offsets])
    hidden = w.one("Reshape", f"{name}/Reshape", [values, w.const([0, 0, q.n_blocks * q.block_size])])
    if q.n_blocks * q.block_size != spec.hidden_size:
        # Rows are padded to whole blocks; drop the padding.
        hidden = w.one("Slice", f"{name}/Slice", [hidden, w.const([0]), w.const([spec.hidden_size]), w.const([-1])])
    return hidden


def _head_norm(w: Writer, name: str, x: str, gamma: np.ndarray, spec: ModelSpec) -> str:
    """RMSNorm over each head of q or k, before rotary (Qwen3, Gemma 3)."""
    scale = w.floats(f"{name}.weight", gamma)
    heads = w.one("Reshape", f"{name}/Reshape", [x, w.const([0, 0, -1, spec.head_dim])])
    normed = w.one(
        "SimplifiedLayerNormalization", f"{name}/SimplifiedLayerNorm", [heads, scale], axis=-1, epsilon=spec.rms_norm_eps
    )
    return w.one("Reshape", f"{name}/Reshape_1", [normed, w.const([0, 0, -1])])


def _norm_name(base: str, hf_name: str) -> str:
    """Node name of a norm: its HF module name under the layer's node path."""
    return f"{base}/{hf_name.rpartition('.')[2]}"


def _post_norm(w: Writer, base: str, hf_name: str | None, source: Source, spec: ModelSpec, x: str) -> str:
    """Gemma's sandwich norm on a block's output, before it joins the residual stream."""
    if hf_name is None:
        return x
    name = _norm_name(base, hf_name)
    scale = w.floats(f"{name}.weight", source.tensor(f"{hf_name}.weight"))
    return w.one("SimplifiedLayerNormalization", f"{name}/SimplifiedLayerNorm", [x, scale], axis=-1,
                 epsilon=spec.rms_norm_eps)


def qkv_projection(
    w: Writer, source: Source, spec: ModelSpec, quant: QuantConfig, loader: WeightLoader | None, i: int,
    layer: Layer, x: str, residual: str | None, *, split: bool, norm: Norm = add_norm,
) -> tuple[list[str], str]:
    """`norm`, the fused QKV projection and, when `split`, q, k and v apart with their head
    norms: ([q, k, v] or [qkv, "", ""], the new residual)."""
    hf = f"model.layers.{i}"
    base = f"/model/layers.{i}"
    normed, residual = norm(w, _norm_name(base, layer.attn_norm), x, residual,
                            source.tensor(f"{layer.attn_norm}.weight"), spec.rms_norm_eps)
    bias = np.concatenate([source.tensor(f"{n}.bias") for n in layer.qkv]) if layer.qkv_bias else None
    qkv_lin = make_linear(w, f"{hf}.self_attn.qkv_proj", source, [f"{n}.weight" for n in layer.qkv], quant, loader,
                          bias)
    qkv = apply_linear(w, f"{base}/attn/qkv_proj", normed, qkv_lin, quant)
    if not split:
        return [qkv, "", ""], residual
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    q, k, v = w.node("Split", f"{base}/attn/qkv_split", [qkv, w.const([q_size, kv_size, kv_size])], 3, axis=-1)
    if layer.q_norm and layer.k_norm:
        q = _head_norm(w, f"{base}/attn/q_norm", q, source.tensor(f"{layer.q_norm}.weight"), spec)
        k = _head_norm(w, f"{base}/attn/k_norm", k, source.tensor(f"{layer.k_norm}.weight"), spec)
    return [q, k, v], residual


def attention(
    w: Writer, source: Source, spec: ModelSpec, quant: QuantConfig, loader: WeightLoader | None, i: int,
    layer: Layer, x: str, residual: str | None, lengths: tuple[str, str], rope: tuple[str, str],
    kv_scales: tuple[np.ndarray, np.ndarray] | None = None, mask: str = "",
) -> tuple[str, str]:
    """Norm, fused QKV projection, GroupQueryAttention with in-place KV (or, for openvino,
    attention from standard ops over `mask`), o_proj.

    `kv_scales` (keys, values: [kv_heads, head_dim]) make the cache int8: the op
    quantizes new rows (round half to even, saturating) and attends over the int8 rows.
    """
    hf = f"model.layers.{i}"
    base = f"/model/layers.{i}"
    split = bool(layer.q_norm and layer.k_norm) or quant.target == "openvino"
    qkv_inputs, residual = qkv_projection(w, source, spec, quant, loader, i, layer, x, residual, split=split)
    o_lin = make_linear(w, f"{hf}.self_attn.o_proj", source, [f"{layer.o}.weight"], quant, loader)
    if quant.target == "openvino":
        attn = openvino.attention(w, spec, i, layer, *qkv_inputs, rope, mask)
        out = apply_linear(w, f"{base}/attn/o_proj", attn, o_lin, quant)
        return _post_norm(w, base, layer.attn_post_norm, source, spec, out), residual
    quantized: list[str] = []
    quant_attrs: dict[str, str | int | float] = {}
    if kv_scales is not None:
        shape = (1, spec.num_kv_heads, 1, spec.head_dim)
        scales = [w.initializer(f"{hf}.self_attn.{kind}_scale", s.astype(np.float32).reshape(shape))
                  for kind, s in zip("kv", kv_scales)]
        # position_ids, attention_bias and head_sink (inputs 9-11) stay empty.
        quantized = ["", "", "", *scales]
        quant_attrs = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    if layer.scale is not None:
        quant_attrs["scale"] = layer.scale
    attn, _, _ = w.node(
        "GroupQueryAttention",
        f"{base}/attn/GroupQueryAttention",
        [*qkv_inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value", *lengths, *rope, *quantized],
        [f"{base}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
        num_heads=spec.num_heads,
        kv_num_heads=spec.num_kv_heads,
        do_rotary=1,
        rotary_interleaved=0,  # HF q/k rows are in rotate-half order
        local_window_size=layer.window or -1,
        **quant_attrs,
    )
    out = apply_linear(w, f"{base}/attn/o_proj", attn, o_lin, quant)
    return _post_norm(w, base, layer.attn_post_norm, source, spec, out), residual


def _activation(w: Writer, name: str, gate: str, kind: str) -> str:
    if kind == "silu":
        sig = w.one("Sigmoid", f"{name}/Sigmoid", [gate])
        return w.one("Mul", f"{name}/Mul", [gate, sig])
    if kind == "gelu_tanh":
        return w.one("Gelu", f"{name}/Gelu", [gate], approximate="tanh")
    raise ExportError(f"activation {kind!r} is not supported (supported: silu, gelu_tanh)")


def mlp(
    w: Writer, source: Source, spec: ModelSpec, quant: QuantConfig, loader: WeightLoader | None, i: int,
    layer: Layer, x: str, residual: str, norm: Norm = add_norm,
) -> tuple[str, str]:
    """`norm`, fused gate;up projection, act(gate) * up, down projection."""
    hf = f"model.layers.{i}"
    base = f"/model/layers.{i}"
    normed, residual = norm(w, _norm_name(base, layer.ffn_norm), x, residual,
                                source.tensor(f"{layer.ffn_norm}.weight"), spec.rms_norm_eps)
    gate_up_lin = make_linear(w, f"{hf}.mlp.gate_up_proj", source, [f"{n}.weight" for n in layer.gate_up], quant,
                              loader)
    gate_up = apply_linear(w, f"{base}/mlp/gate_up_proj", normed, gate_up_lin, quant)
    gate, up = w.node("Split", f"{base}/mlp/Split", [gate_up], 2, axis=-1, num_outputs=2)
    hidden = w.one("Mul", f"{base}/mlp/Mul", [_activation(w, f"{base}/mlp/act", gate, layer.activation), up])
    down_lin = make_linear(w, f"{hf}.mlp.down_proj", source, [f"{layer.down}.weight"], quant, loader)
    out = apply_linear(w, f"{base}/mlp/down_proj", hidden, down_lin, quant)
    return _post_norm(w, base, layer.ffn_post_norm, source, spec, out), residual


def head_weights(
    w: Writer, source: Source, spec: ModelSpec, quant: QuantConfig, loader: WeightLoader | None
) -> tuple[Linear, QuantizedWeight | None]:
    """lm_head, from the embedding when tied; its quantized form too, for the embedding to share."""
    name = "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"
    if loader is not None:
        [q] = loader.load([name])
        return quantized_linear(w, "lm_head", q, None, quant), q if spec.tie_embeddings else None
    return make_linear(w, "lm_head", source, [name], quant, None), None


def head(w: Writer, source: Source, spec: ModelSpec, quant: QuantConfig, lin: Linear, x: str, residual: str) -> str:
    """Final norm, keep the last `logits_to_keep` positions, lm_head."""
    normed, _ = add_norm(w, "/model/norm", x, residual, source.tensor("model.norm.weight"), spec.rms_norm_eps)
    # Only the kept rows reach lm_head: a long prefill never builds S x vocab logits.
    start = w.one("Neg", "/model/logits_to_keep/Neg", ["logits_to_keep"])
    kept = w.one("Slice", "/model/logits_to_keep/Slice", [normed, start, w.const([_INT64_MAX]), w.const([1])])
    if w.float_proto == TensorProto.FLOAT:
        return apply_linear(w, "/lm_head", kept, lin, quant, out="logits")
    logits = apply_linear(w, "/lm_head", kept, lin, quant)
    return w.node("Cast", "/lm_head/Cast", [logits], ["logits"], to=TensorProto.FLOAT)[0]


# --- the model ---------------------------------------------------------------


def _io(
    spec: ModelSpec, kv_type: int = TensorProto.FLOAT, target: str = "cpu"
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    # "batch": rows of cache slots decoded together; each row's length comes from its
    # right-padded attention_mask row (attention_lengths), so rows may differ in length.
    kv_shape = ["batch", spec.num_kv_heads, "max_seq_len", spec.head_dim]
    past_shape = present_shape = kv_shape
    if target == "openvino":  # sequence-major; present holds the new rows only
        past_shape = ["batch", "past_sequence_length", spec.num_kv_heads, spec.head_dim]
        present_shape = ["batch", "sequence_length", spec.num_kv_heads, spec.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"]),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]),
    ]
    logits_shape = ["batch", "kept_positions", spec.vocab_size]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits_shape)]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", kv_type, past_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", kv_type, present_shape))
    return inputs, outputs


def _notes(spec: ModelSpec, quant: QuantConfig, loader: WeightLoader | None) -> list[str]:
    if quant.target == "cuda":
        return [*_weight_notes(spec, quant, loader),
                "cuda: float16 activations, norm weights, rotary caches and KV cache (onnxruntime's CUDA kernels); "
                "norms accumulate in float32; logits cast to float32"]
    if quant.target == "openvino":
        return [*_weight_notes(spec, quant, loader),
                "openvino: attention and rotary from standard ops (no GroupQueryAttention); float32 KV cache, "
                "sequence-major, present = the new rows only"]
    return _weight_notes(spec, quant, loader)


def _weight_notes(spec: ModelSpec, quant: QuantConfig, loader: WeightLoader | None) -> list[str]:
    if loader is not None:
        sym = "symmetric" if quant.symmetric else "asymmetric"
        notes = [f"{quant.weights} MatMulNBits, block {quant.block_size}, {sym}, accuracy_level {quant.accuracy_level}"]
        if spec.tie_embeddings:
            shared = ("lm_head's packed codes, scales of its own" if quant.target == "openvino" else
                      "lm_head's weight, scales and offsets (stored once)")
        else:
            shared = "a quantized table of its own"
        return notes + [f"embedding: Gather + dequantize of {shared}"] + loader.notes()
    if quant.weights == "fp16" and quant.target == "cuda":
        return ["fp16: MatMul on transposed float16 weights"]
    if quant.weights == "fp16":
        return ["fp16: weights stored float16 and widened to float32 when the session loads; compute and KV in float32"]
    return ["fp32: MatMul on transposed float32 weights"]


def build_fast_graph(
    source: Source,
    quant: QuantConfig,
    out_dir: Path,
    progress: Progress | None = None,
    *,
    requantize: bool = False,
    kv_scales: tuple[np.ndarray, np.ndarray] | None = None,
) -> GraphInfo:
    """Write `out_dir/model.onnx` (+ `model.onnx.data`); see the module docstring. One-token steps
    take a row per cache slot; onnxruntime's GroupQueryAttention takes a multi-token step after
    cached rows (a prefill chunk, a draft to verify) for one row only.

    int4 at block 32 imports GGUF blocks of every common type as they are (weights.py); `requantize`
    rounds them afresh instead (for comparing the two). `kv_scales` (keys, values:
    float32 [num_layers, kv_heads, head_dim], see calibrate.py) make the KV cache
    int8; without them it is in the activations' dtype whatever `quant.kv_cache` says.
    """
    spec = source.spec
    out_dir = Path(out_dir)
    family = arch.by_spec(spec.arch)
    if family is None:
        raise ExportError(f"architecture {spec.arch!r} has no fast graph (fast: {', '.join(arch.FAST_ARCHS)})")
    if spec.head_dim % 2:
        raise ExportError(f"head_dim {spec.head_dim}: rotary embedding needs an even head size")
    if kv_scales is not None and quant.target != "cpu":
        raise ExportError(f"kv_scales: an int8 KV cache is built for the cpu target only, not {quant.target!r}")
    if kv_scales is not None:
        expected = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
        if any(np.shape(s) != expected for s in kv_scales):
            raise ExportError(f"kv_scales: shapes {[np.shape(s) for s in kv_scales]}, expected {expected} each")
        if not all(np.all(np.isfinite(s) & (s > 0)) for s in kv_scales):
            raise ExportError("kv_scales: every scale must be finite and positive")
    loader = WeightLoader(source, quant, exact=not requantize) if weight_bits(quant) else None
    w = Writer(out_dir / DATA_FILE, quant.activation_dtype)
    try:
        layers = [family.layer(spec, i) for i in range(spec.num_layers)]
        openvino_graph = quant.target == "openvino"
        lengths = openvino.steps(w) if openvino_graph else attention_lengths(w)
        ropes: dict[str, tuple[str, str]] = {}
        for layer in layers:
            if layer.rope.name not in ropes:
                cos, sin = rope_caches(spec, layer.rope)
                suffix = f"_{layer.rope.name}" if layer.rope.name else ""
                ropes[layer.rope.name] = (openvino.rotary(w, suffix, cos, sin, lengths) if openvino_graph else
                                          (w.floats(f"cos_cache{suffix}", cos), w.floats(f"sin_cache{suffix}", sin)))
        group = spec.num_heads // spec.num_kv_heads
        masks = {window: openvino.group_mask(w, openvino.attention_mask(w, lengths, window), group)
                 for window in {la.window for la in layers}} if openvino_graph else {}
        lm_head, lm_head_q = head_weights(w, source, spec, quant, loader)
        x, residual = embed(w, source, spec, quant, loader, lm_head, lm_head_q), None
        if spec.embedding_scale is not None:
            scale = w.floats("/model/embed_tokens/scale", np.array(spec.embedding_scale, dtype=np.float32))
            x = w.one("Mul", "/model/embed_tokens/Mul", [x, scale])
        for i, layer in enumerate(layers):
            layer_scales = None if kv_scales is None else (kv_scales[0][i], kv_scales[1][i])
            x, residual = attention(w, source, spec, quant, loader, i, layer, x, residual, lengths,
                                    ropes[layer.rope.name], layer_scales, masks.get(layer.window, ""))
            x, residual = mlp(w, source, spec, quant, loader, i, layer, x, residual)
            if progress:
                progress("layers", i + 1, spec.num_layers)
        head(w, source, spec, quant, lm_head, x, residual)
    finally:
        w.close()
    kv_dtype = "int8" if kv_scales is not None else w.float_type.name
    inputs, outputs = _io(spec, helper.np_dtype_to_tensor_dtype(np.dtype(kv_dtype)), quant.target)
    graph = helper.make_graph(w.nodes, "edgellm_fast", inputs, outputs, w.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        ir_version=IR_VERSION,
        producer_name="edgellm",
    )
    onnx.save_model(model, out_dir / GRAPH_FILE)
    notes = _notes(spec, quant, loader)
    if kv_scales is not None:
        notes.append("KV cache: int8 per channel (GroupQueryAttention PER_CHANNEL), scales calibrated on the eval text")
    return GraphInfo(
        kind="fast",
        file=GRAPH_FILE,
        inputs=[v.name for v in inputs],
        outputs=[v.name for v in outputs],
        kv_dtype=kv_dtype,
        # openvino's present rows land at one offset for the whole batch: one stream at a time.
        batch=quant.target != "openvino",
        target=quant.target,
        notes=notes,
        worst_weights=loader.worst() if loader is not None else [],
        reblocked=loader.reblocked() if loader is not None else [],
        block_sums=w.block_sums,
    )

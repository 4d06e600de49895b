"""The Qualcomm HTP variant (`--target qnn`): one token a step, every shape static.

QNN's HTP compiles a graph whole, for fixed shapes, from plain ops; with CPU fallback
disabled onnxruntime refuses a session unless every node is QNN's. benchmarks/qnn_probe.py
found what it takes (benchmarks/README.md, "Qualcomm HTP"), and this graph follows that
recipe on the openvino target's weights:

- inputs `input_ids` [1, 1] and `position_ids` [1, 1], int32 (QNN casts int64 first),
  and the WHOLE preallocated cache as `past_key_values.{i}.*` [1, context, kv_heads, head_dim];
  outputs `logits` [1, 1, vocab] and the new rows only as `present.{i}.*` [1, 1, kv_heads,
  head_dim], which the runtime binds into its buffer at row `position_ids`
  (edgellm.runtime.runner.OneTokenRunner). `context` is fixed at export: every step attends over all of it.
- the additive mask is built in the graph from the position (rows before it, and the new
  row, attend; -10000 elsewhere, finite in fp16), so the runtime feeds no mask.
- rotary from Slice/Mul/Sub/Add/Concat, cos/sin rows gathered by position (QNN takes no
  RotaryEmbedding); attention from MatMul/Softmax with the query heads folded to
  [kv_heads, group], so keys and values are never repeated; RMSNorm as Add +
  SimplifiedLayerNormalization (QNN takes no SkipSimplifiedLayerNormalization); SiLU as Sigmoid*Mul.
- weights: float (the HTP runs them at fp16) or MatMulNBits at float activations, laid out
  as for the openvino target; the embedding of a quantized model is a dequantized float
  table (QNN takes no Gather of uint8 codes).

Prompts go through the same one-token step; a fixed-length prefill graph is future work.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellm.errors import ExportError
from edgellm.runtime.model_spec import ModelSpec

from . import arch
from .arch import Layer
from .config import GraphInfo, QuantConfig
from .graph import (DATA_FILE, GRAPH_FILE, IR_VERSION, OPSET, Progress, _post_norm, _weight_notes, embed,
                    head_weights, mlp, qkv_projection, rope_caches)
from .linear import Linear, Writer, apply_linear, make_linear, weight_bits
from .quantize import QuantizedWeight, dequantize
from .sources import Source
from .weights import WeightLoader

MASKED = -10000.0  # fp16 holds it (and twice it), and exp() of it is 0 in fp16 and fp32 alike
POSITION = "position_ids"


def build_qnn_graph(source: Source, quant: QuantConfig, out_dir: Path, progress: Progress | None = None) -> GraphInfo:
    """Write `out_dir/model.onnx` (+ `model.onnx.data`): the one-token step of the module docstring,
    over a cache of `quant.context` rows."""
    if quant.target != "qnn" or quant.context is None:
        raise ExportError(f"build_qnn_graph needs QuantConfig(target='qnn'), got target {quant.target!r}")
    context, spec = quant.context, source.spec
    family = arch.by_spec(spec.arch)
    if family is None:
        raise ExportError(f"architecture {spec.arch!r} has no fast graph (fast: {', '.join(arch.FAST_ARCHS)})")
    if not 2 <= context <= spec.max_context:
        raise ExportError(f"--context {context}: expected 2 to the model's max_context {spec.max_context}")
    if spec.head_dim % 2:
        raise ExportError(f"head_dim {spec.head_dim}: rotary embedding needs an even head size")
    # The openvino target's weight storage: float activations into MatMulNBits (accuracy level 0).
    storage = replace(quant, target="openvino", context=None)
    loader = WeightLoader(source, storage) if weight_bits(storage) else None
    w = Writer(Path(out_dir) / DATA_FILE)
    try:
        layers = [family.layer(spec, i) for i in range(spec.num_layers)]
        masks = _masks(w, context, {la.window for la in layers})
        ropes = {la.rope.name: _rotary_rows(w, spec, la, context) for la in {la.rope.name: la for la in layers}.values()}
        lm_head, lm_head_q = head_weights(w, source, spec, storage, loader)
        x = _embed(w, source, spec, storage, loader, lm_head, lm_head_q)
        if spec.embedding_scale is not None:
            x = w.one("Mul", "/model/embed_tokens/Mul", [x, w.floats("/model/embed_tokens/scale",
                                                                     np.array(spec.embedding_scale))])
        residual = None
        for i, layer in enumerate(layers):
            x, residual = _attention(w, source, spec, storage, loader, i, layer, x, residual,
                                     ropes[layer.rope.name], masks[layer.window])
            x, residual = mlp(w, source, spec, storage, loader, i, layer, x, residual, norm=_add_norm)
            if progress:
                progress("layers", i + 1, spec.num_layers)
        normed, _ = _add_norm(w, "/model/norm", x, residual, source.tensor("model.norm.weight"), spec.rms_norm_eps)
        apply_linear(w, "/lm_head", normed, lm_head, storage, out="logits")
    finally:
        w.close()
    inputs, outputs = _io(spec, context)
    graph = helper.make_graph(w.nodes, "edgellm_qnn", inputs, outputs, w.initializers)
    model = helper.make_model(graph, ir_version=IR_VERSION, producer_name="edgellm", opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    onnx.save_model(model, Path(out_dir) / GRAPH_FILE)
    notes = _weight_notes(spec, storage, loader)
    if loader is not None:  # not the openvino graph's Gather + unpack
        notes[1] = "embedding: a dequantized float table (QNN takes no Gather of packed codes)"
    notes += [f"qnn: static shapes, one token a step over a context of {context} fixed at export (prompts too); "
             "attention, rotary and mask from standard ops; float32 KV cache, sequence-major, present = the new row"]
    return GraphInfo(kind="fast", file=GRAPH_FILE, inputs=[v.name for v in inputs], outputs=[v.name for v in outputs],
                     kv_dtype="float32", batch=False, target="qnn", context=context, notes=notes,
                     worst_weights=loader.worst() if loader is not None else [],
                     reblocked=loader.reblocked() if loader is not None else [])


def _io(spec: ModelSpec, context: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    kv = [spec.num_kv_heads, spec.head_dim]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT32, [1, 1]) for name in ("input_ids", POSITION)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, spec.vocab_size])]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        [1, context, *kv]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, [1, 1, *kv]))
    return inputs, outputs


def _masks(w: Writer, context: int, windows: set[int | None]) -> dict[int | None, str]:
    """Additive masks [1, context + 1] over the cache rows and the new row, one per window: 0 for
    a row before the position (and within the window of it) and for the new row, MASKED elsewhere
    (rows not written yet, stale after a rewind, or the one the step writes its present into)."""
    zero, masked = w.floats("/model/mask/zero", np.array(0.0)), w.floats("/model/mask/masked", np.array(MASKED))
    # The new row is last; as key -1 it is before every position.
    keys = w.initializer("/model/mask/keys", np.array([*range(context), -1], np.int32))
    causal = w.one("Where", "/model/mask/Where", [w.one("Less", "/model/mask/Less", [keys, POSITION]), zero, masked])
    masks: dict[int | None, str] = {window: causal for window in windows if window is None or window >= context}
    narrow = sorted(window for window in windows if window not in masks)
    # As key `context` the new row is within every window.
    late = w.initializer("/model/mask/keys_1", np.arange(context + 1, dtype=np.int32)) if narrow else ""
    for window in narrow:
        base = f"/model/mask_window{window}"
        start = w.one("Sub", f"{base}/Sub", [POSITION, w.initializer(f"{base}/window", np.array(window, np.int32))])
        inside = w.one("Where", f"{base}/Where", [w.one("Greater", f"{base}/Greater", [late, start]), zero, masked])
        masks[window] = w.one("Add", f"{base}/Add", [causal, inside])
    return masks


def _rotary_rows(w: Writer, spec: ModelSpec, layer: Layer, context: int) -> tuple[str, str]:
    """cos and sin of the step's position, [1, 1, 1, rotary_dim / 2], from tables of `context` rows."""
    suffix = f"_{layer.rope.name}" if layer.rope.name else ""
    rows = []
    for kind, table in zip(("cos", "sin"), rope_caches(spec, layer.rope)):
        name = f"/model/rotary{suffix}/{kind}"
        picked = w.one("Gather", f"{name}/Gather", [w.floats(f"{kind}_cache{suffix}", table[:context]), POSITION],
                       axis=0)
        rows.append(w.one("Reshape", f"{name}/Reshape", [picked, w.const([1, 1, 1, table.shape[1]])]))
    return rows[0], rows[1]


def _rotate(w: Writer, name: str, x: str, rope: tuple[str, str], dim: int, head_dim: int,
            out: str | None = None) -> str:
    """Rotate-half rotary of x [1, 1, heads, head_dim] over its first `dim` dims:
    (a, b) -> (a·cos - b·sin, b·cos + a·sin), from Slice/Mul/Sub/Add/Concat."""
    cos, sin = rope
    half = dim // 2
    a = w.one("Slice", f"{name}/Slice", [x, w.const([0]), w.const([half]), w.const([-1])])
    b = w.one("Slice", f"{name}/Slice_1", [x, w.const([half]), w.const([dim]), w.const([-1])])
    first = w.one("Sub", f"{name}/Sub", [w.one("Mul", f"{name}/Mul", [a, cos]), w.one("Mul", f"{name}/Mul_1", [b, sin])])
    second = w.one("Add", f"{name}/Add", [w.one("Mul", f"{name}/Mul_2", [b, cos]),
                                          w.one("Mul", f"{name}/Mul_3", [a, sin])])
    parts = [first, second]
    if dim < head_dim:
        parts.append(w.one("Slice", f"{name}/Slice_2", [x, w.const([dim]), w.const([head_dim]), w.const([-1])]))
    return w.node("Concat", f"{name}/Concat", parts, [out] if out else 1, axis=-1)[0]


def _add_norm(w: Writer, name: str, x: str, residual: str | None, gamma: np.ndarray, eps: float) -> tuple[str, str]:
    """RMSNorm(x + residual); returns (normed, new residual). graph.add_norm's fused
    SkipSimplifiedLayerNormalization is a node QNN does not take."""
    total = x if residual is None else w.one("Add", f"{name}/Add", [x, residual])
    normed = w.one("SimplifiedLayerNormalization", f"{name}/SimplifiedLayerNorm", [total, w.floats(f"{name}.weight",
                                                                                                   gamma)],
                   axis=-1, epsilon=eps)
    return normed, total


def _attention(w: Writer, source: Source, spec: ModelSpec, quant: QuantConfig, loader: WeightLoader | None, i: int,
               layer: Layer, x: str, residual: str | None, rope: tuple[str, str], mask: str) -> tuple[str, str]:
    """Norm, QKV projection, rotary, the new rows as `present.{i}.*`, attention over the whole
    cache and the new row with the query heads folded per KV head, o_proj."""
    hf, base = f"model.layers.{i}", f"/model/layers.{i}"
    heads, kv_heads, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    (q, k, v), residual = qkv_projection(w, source, spec, quant, loader, i, layer, x, residual, split=True,
                                         norm=_add_norm)
    dim = int(d * spec.partial_rotary_factor)
    q = _rotate(w, f"{base}/attn/q_rotary", w.one("Reshape", f"{base}/attn/q/Reshape", [q, w.const([1, 1, heads, d])]),
                rope, dim, d)
    k = _rotate(w, f"{base}/attn/k_rotary", w.one("Reshape", f"{base}/attn/k/Reshape", [k, w.const([1, 1, kv_heads, d])]),
                rope, dim, d, out=f"present.{i}.key")
    v = w.node("Reshape", f"{base}/attn/v/Reshape", [v, w.const([1, 1, kv_heads, d])], [f"present.{i}.value"])[0]
    # [1, rows, kv_heads, d] -> keys [1, kv_heads, d, rows], values [1, kv_heads, rows, d]
    keys, values = (w.one("Transpose", f"{base}/attn/{kind}/Transpose", [
        w.one("Concat", f"{base}/attn/{kind}/Concat", [f"past_key_values.{i}.{kind}", new], axis=1)], perm=perm)
        for kind, new, perm in (("key", k, [0, 2, 3, 1]), ("value", v, [0, 2, 1, 3])))
    grouped = w.one("Reshape", f"{base}/attn/q/Reshape_1", [q, w.const([1, kv_heads, heads // kv_heads, d])])
    scale = layer.scale if layer.scale is not None else d ** -0.5
    scores = w.one("Mul", f"{base}/attn/Mul", [w.one("MatMul", f"{base}/attn/MatMul", [grouped, keys]),
                                               w.floats(f"{base}/attn/scale", np.array(scale))])
    probs = w.one("Softmax", f"{base}/attn/Softmax", [w.one("Add", f"{base}/attn/Add", [scores, mask])], axis=-1)
    attn = w.one("Reshape", f"{base}/attn/Reshape", [w.one("MatMul", f"{base}/attn/MatMul_1", [probs, values]),
                                                     w.const([1, 1, heads * d])])
    o_lin = make_linear(w, f"{hf}.self_attn.o_proj", source, [f"{layer.o}.weight"], quant, loader)
    out = apply_linear(w, f"{base}/attn/o_proj", attn, o_lin, quant)
    return _post_norm(w, base, layer.attn_post_norm, source, spec, out), residual


def _embed(w: Writer, source: Source, spec: ModelSpec, quant: QuantConfig, loader: WeightLoader | None,
           head: Linear, head_q: QuantizedWeight | None) -> str:
    """input_ids -> hidden states: graph.embed for float weights; for quantized ones one Gather
    from the dequantized table (the values the cpu graph's gather yields)."""
    if loader is None:
        return embed(w, source, spec, quant, None, head, None)
    q = head_q if head_q is not None else loader.load(["model.embed_tokens.weight"])[0]
    table = w.floats("model.embed_tokens.weight", dequantize(q))
    return w.one("Gather", "/model/embed_tokens/Gather", [table, "input_ids"], axis=0)

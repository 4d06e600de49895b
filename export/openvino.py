"""The OpenVINO variant of the fast graph (`--target openvino`): standard ops where the cpu graph
uses contrib ops OpenVINO does not take.

onnxruntime's OpenVINO provider takes MatMulNBits and both RMS norms but not
GroupQueryAttention, so the cpu graph splits into ~31 OpenVINO partitions around 30
attention nodes left to the CPU. Here attention is (q·scale)·Kᵀ + mask ->
Softmax -> ·V with the query heads grouped by their KV head, which OpenVINO's CPU plugin runs as
one fused subgraph per layer (measured: not its ScaledDotProductAttention node), rotary is
rotate-half from Slice/Neg/Concat (fused into OpenVINO's RoPE node), and the embedding keeps
per-block floats of its own (int4 offsets rewrite lm_head's scales into float zero points).

The KV cache is sequence-major, [batch, rows, kv_heads, head_dim]: `past_key_values.*` are the
rows cached so far, and `present.*` only the new rows, so the runtime binds past to the first
rows of one preallocated buffer and present to the rows right after them
(edgellm.runtime.caches.AppendCache): no step copies the cache, whichever provider runs it.
The shared nodes (positions, mask, rotary tables) are built once, before the layers.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgellm.runtime.model_spec import ModelSpec

from .arch import Layer
from .linear import Writer, gathered_codes
from .quantize import QuantizedWeight, zero_point_values

_NEG = float(np.finfo(np.float32).min)  # transformers' mask value: exp() is 0, a whole row stays finite


def steps(w: Writer) -> tuple[str, str]:
    """(positions of the new tokens P..T-1, positions of every key 0..T-1), int64 ranges:
    T is attention_mask's width and P what was cached before this step."""
    base = "/model/positions"
    total = w.one("Gather", f"{base}/total", [w.one("Shape", f"{base}/Shape", ["attention_mask"]), w.const(1)], axis=0)
    new = w.one("Gather", f"{base}/new", [w.one("Shape", f"{base}/Shape_1", ["input_ids"]), w.const(1)], axis=0)
    past = w.one("Sub", f"{base}/past", [total, new])
    return (w.one("Range", f"{base}/queries", [past, total, w.const(1)]),
            w.one("Range", f"{base}/keys", [w.const(0), total, w.const(1)]))


def attention_mask(w: Writer, positions: tuple[str, str], window: int | None) -> str:
    """Additive mask [batch, 1, new, total]: 0 where a new token may look (causal, within
    `window`, and where attention_mask is 1), the float32 minimum elsewhere."""
    queries, keys = positions
    base = f"/model/mask{'' if window is None else f'_window{window}'}"
    column = w.one("Unsqueeze", f"{base}/queries/Unsqueeze", [queries, w.const([1])])  # [new, 1]
    allowed = w.one("LessOrEqual", f"{base}/causal", [keys, column])  # [new, total]
    if window is not None:
        start = w.one("Sub", f"{base}/window/Sub", [column, w.const(window)])
        allowed = w.one("And", f"{base}/window/And", [allowed, w.one("Greater", f"{base}/window", [keys, start])])
    padded = w.one("Cast", f"{base}/padding", ["attention_mask"], to=TensorProto.BOOL)
    padded = w.one("Unsqueeze", f"{base}/padding/Unsqueeze", [padded, w.const([1, 2])])  # [batch, 1, 1, total]
    allowed = w.one("And", f"{base}/And", [allowed, padded])
    zero, neg = w.floats(f"{base}/zero", np.array(0.0)), w.floats("/model/mask/min", np.array(_NEG))
    return w.one("Where", f"{base}/Where", [allowed, zero, neg])


def rotary(w: Writer, name: str, cos: np.ndarray, sin: np.ndarray, positions: tuple[str, str]) -> tuple[str, str]:
    """cos/sin rows of the new positions, [1, new, 1, rotary_dim] (both halves), for rotate-half."""
    rows = []
    for kind, table in (("cos", cos), ("sin", sin)):
        full = w.floats(f"{kind}_cache{name}", np.concatenate([table, table], axis=-1))
        picked = w.one("Gather", f"/model/rotary{name}/{kind}/Gather", [full, positions[0]], axis=0)
        rows.append(w.one("Unsqueeze", f"/model/rotary{name}/{kind}/Unsqueeze", [picked, w.const([0, 2])]))
    return rows[0], rows[1]


def _rotate(w: Writer, name: str, x: str, rope: tuple[str, str], dim: int, head_dim: int,
            out: str | None = None) -> str:
    """x·cos + rotate_half(x)·sin over the first `dim` of each head's `head_dim` ([b, s, heads, head_dim])."""
    half = dim // 2
    first = w.one("Slice", f"{name}/Slice", [x, w.const([0]), w.const([half]), w.const([-1])])
    second = w.one("Slice", f"{name}/Slice_1", [x, w.const([half]), w.const([dim]), w.const([-1])])
    turned = w.one("Concat", f"{name}/Concat", [w.one("Neg", f"{name}/Neg", [second]), first], axis=-1)
    rot = x if dim == head_dim else w.one("Slice", f"{name}/Slice_2", [x, w.const([0]), w.const([dim]),
                                                                        w.const([-1])])
    outputs = [out] if out and dim == head_dim else 1
    rotated = w.node("Add", f"{name}/Add", [w.one("Mul", f"{name}/Mul", [rot, rope[0]]),
                                            w.one("Mul", f"{name}/Mul_1", [turned, rope[1]])], outputs)[0]
    if dim == head_dim:
        return rotated
    rest = w.one("Slice", f"{name}/Slice_3", [x, w.const([dim]), w.const([head_dim]), w.const([-1])])
    return w.node("Concat", f"{name}/Concat_1", [rotated, rest], [out] if out else 1, axis=-1)[0]


def attention(w: Writer, spec: ModelSpec, i: int, layer: Layer, q: str, k: str, v: str,
              rope: tuple[str, str], mask: str) -> str:
    """Rotary, the new KV rows as `present.{i}.*`, attention over past + new; [b, s, heads * head_dim].

    Query heads are grouped by the KV head they share, [b, kv_heads, group * s, head_dim], so
    no KV row is ever repeated (`mask` comes tiled to group * s rows, see group_mask); the scale
    goes on q, the smallest tensor it can."""
    base = f"/model/layers.{i}/attn"
    heads, kv_heads, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    dim = int(d * spec.partial_rotary_factor)
    q = w.one("Reshape", f"{base}/q/Reshape", [q, w.const([0, 0, heads, d])])
    k = w.one("Reshape", f"{base}/k/Reshape", [k, w.const([0, 0, kv_heads, d])])
    new_v = w.node("Reshape", f"{base}/v/Reshape", [v, w.const([0, 0, kv_heads, d])], [f"present.{i}.value"])[0]
    q = _rotate(w, f"{base}/q_rotary", q, rope, dim, d)
    new_k = _rotate(w, f"{base}/k_rotary", k, rope, dim, d, out=f"present.{i}.key")
    scale = layer.scale if layer.scale is not None else d ** -0.5
    q = w.one("Mul", f"{base}/q/Mul", [q, w.floats(f"{base}/scale", np.array(scale))])
    q = w.one("Transpose", f"{base}/q/Transpose", [q], perm=[0, 2, 1, 3])  # [b, h, s, d]
    q = w.one("Reshape", f"{base}/q/Reshape_1", [q, w.const([0, kv_heads, -1, d])])  # [b, kv, group * s, d]
    rows = []
    for kind, new in (("key", new_k), ("value", new_v)):
        cat = w.one("Concat", f"{base}/{kind}/Concat", [f"past_key_values.{i}.{kind}", new], axis=1)
        rows.append(w.one("Transpose", f"{base}/{kind}/Transpose", [cat], perm=[0, 2, 1, 3]))  # [b, kv, t, d]
    keys_t = w.one("Transpose", f"{base}/key/Transpose_1", [rows[0]], perm=[0, 1, 3, 2])
    scores = w.one("Add", f"{base}/Add", [w.one("MatMul", f"{base}/MatMul", [q, keys_t]), mask])
    probs = w.one("Softmax", f"{base}/Softmax", [scores], axis=-1)
    out = w.one("MatMul", f"{base}/MatMul_1", [probs, rows[1]])  # [b, kv, group * s, d]
    out = w.one("Reshape", f"{base}/Reshape", [out, w.const([0, heads, -1, d])])
    out = w.one("Transpose", f"{base}/Transpose", [out], perm=[0, 2, 1, 3])
    return w.one("Reshape", f"{base}/Reshape_1", [out, w.const([0, 0, heads * d])])


def group_mask(w: Writer, mask: str, group: int) -> str:
    """`mask` [b, 1, s, t] repeated for each query head of a KV group: [b, 1, group * s, t]."""
    return mask if group == 1 else w.one("Tile", f"{mask}/Tile", [mask, w.const([1, 1, group, 1])])


def embed_quantized(w: Writer, spec: ModelSpec, q: QuantizedWeight, table: str | None = None) -> str:
    """input_ids -> hidden states from a block-quantized table: gather the packed rows, unpack
    the codes, code·scale + shift per block (shift: -zero_point·scale, plus GGUF's offset).
    `table`: lm_head's packed weight when tied (the same bytes, stored once); its scales
    are not shared, as int4 offsets rewrite them into float zero points (linear.py)."""
    name = "/model/embed_tokens"
    table = table or w.initializer("model.embed_tokens.qweight", q.packed)  # [vocab, n_blocks, blob]
    shift = -zero_point_values(q).astype(np.float32) * q.scales
    if q.offsets is not None:
        shift = shift + q.offsets
    per_block = []
    for kind, values in (("scales", q.scales), ("shift", shift)):
        gathered = w.one("Gather", f"{name}/{kind}/Gather", [w.floats(f"model.embed_tokens.{kind}", values),
                                                              "input_ids"], axis=0)
        per_block.append(w.one("Unsqueeze", f"{name}/{kind}/Unsqueeze", [gathered, w.const([-1])]))
    packed = w.one("Gather", f"{name}/Gather", [table, "input_ids"], axis=0)  # [b, s, n_blocks, blob]
    codes = gathered_codes(w, name, packed, q.bits, [0, 0, q.n_blocks, q.block_size])
    values = w.one("Add", f"{name}/Add", [w.one("Mul", f"{name}/Mul", [codes, per_block[0]]), per_block[1]])
    hidden = w.one("Reshape", f"{name}/Reshape", [values, w.const([0, 0, q.n_blocks * q.block_size])])
    if q.n_blocks * q.block_size != spec.hidden_size:
        hidden = w.one("Slice", f"{name}/Slice", [hidden, w.const([0]), w.const([spec.hidden_size]), w.const([-1])])
    return hidden

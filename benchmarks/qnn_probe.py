"""What a graph must look like to run on Qualcomm's HTP through onnxruntime-qnn, found by running it.

    python benchmarks/qnn_probe.py [--probes ops,weights,decoder,smollm2] [--layers 1] [--past 32]

Each probe is a small hand-built ONNX graph run twice, on the QNN provider (HTP backend,
fp16 precision; on x86-64 the HTP is a simulator) and on the CPU provider. The table says
how many of the graph's nodes QNN took (from QNN's own op trace), which op types it left
to the CPU, the QNN ops it built, the largest difference from the CPU provider, and the
milliseconds per run of each. The decoder probes are one-token steps of a static-shape
decoder (a fixed past of N rows plus an additive mask, new K/V rows out, the caller
copying them into its cache), the shape an NPU export of edgellm would take; they open
QNN with CPU fallback disabled, so "whole graph on HTP" means exactly that.

Weights are random: placement, error and timing need no trained model.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

QNN = "QNNExecutionProvider"
# Snapdragon X Elite (HTP v73). fp16 precision on the HTP needs a SoC to compile for.
SOC_MODEL = "60"
MASKED = -10000.0  # finite: fp16 holds it, and exp() of it is 0 in fp16 and fp32 alike
_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
         np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32}


@dataclass(frozen=True)
class Shape:
    """The sizes of one decoder."""
    hidden: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int
    layers: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY = Shape(hidden=64, heads=4, kv_heads=2, inter=128, vocab=256, layers=2)
SMOLLM2 = Shape(hidden=576, heads=9, kv_heads=3, inter=1536, vocab=49152, layers=30)


# ---------------------------------------------------------------------------- graph building

@dataclass
class Graph:
    """Nodes, constants and typed inputs of one probe graph; `op` returns its output's name."""
    opset: int = 21
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    extra_opsets: dict = field(default_factory=dict)

    def input(self, name: str, dtype: Any, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _ONNX[np.dtype(dtype)], shape))
        return name

    def const(self, value: Any, name: str | None = None) -> str:
        name = name or f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, kind: str, *inputs: str, domain: str = "", out: str | None = None, **attrs: Any) -> str:
        out = out or f"{kind.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(kind, list(inputs), [out], name=f"n{len(self.nodes)}_{kind}",
                                           domain=domain or None, **attrs))
        if domain:
            self.extra_opsets[domain] = 1
        return out

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        outs = [onnx.ValueInfoProto(name=o) for o in outputs]  # onnxruntime infers their types
        g = helper.make_graph(self.nodes, "probe", self.inputs, outs, self.inits)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v)
                                                          for d, v in self.extra_opsets.items()]
        m = helper.make_model(g, opset_imports=opsets)
        m.ir_version = 10
        return onnx.shape_inference.infer_shapes(m)


def rms_norm(g: Graph, x: str, hidden: int, how: str = "std") -> str:
    """RMSNorm (eps 1e-5) three ways: standard ops, opset 23's RMSNormalization, and onnxruntime's
    SimplifiedLayerNormalization (its schema lives in the ONNX domain)."""
    gamma = g.const(np.random.default_rng(hidden).uniform(0.5, 1.5, hidden).astype(np.float32))  # the same every run
    if how == "rms23":
        return g.op("RMSNormalization", x, gamma, axis=-1, epsilon=1e-5)
    if how == "simplified":
        return g.op("SimplifiedLayerNormalization", x, gamma, axis=-1, epsilon=1e-5)
    ms = g.op("ReduceMean", g.op("Mul", x, x), g.const(np.array([-1], np.int64)), keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(np.float32(1e-5)))))
    return g.op("Mul", g.op("Mul", x, inv), gamma)


def rotary(g: Graph, x: str, cos: str, sin: str, half: int) -> str:
    """rotate_half rotary on the last axis from Slice/Mul/Sub/Add/Concat; cos, sin broadcast."""
    lo = g.op("Slice", x, g.const(np.array([0], np.int64)), g.const(np.array([half], np.int64)),
              g.const(np.array([-1], np.int64)))
    hi = g.op("Slice", x, g.const(np.array([half], np.int64)), g.const(np.array([2 * half], np.int64)),
              g.const(np.array([-1], np.int64)))
    a = g.op("Sub", g.op("Mul", lo, cos), g.op("Mul", hi, sin))
    b = g.op("Add", g.op("Mul", hi, cos), g.op("Mul", lo, sin))
    return g.op("Concat", a, b, axis=-1)


def rotary_tables(g: Graph, position: str, head_dim: int, max_pos: int) -> tuple[str, str]:
    """cos/sin rows for `position` [1, 1] gathered from constant tables, shaped [1, 1, 1, half]."""
    half = head_dim // 2
    freq = 1.0 / (10000.0 ** (np.arange(half, dtype=np.float64) / half))
    angles = np.outer(np.arange(max_pos), freq)
    shape = g.const(np.array([1, 1, 1, half], np.int64))
    cos = g.op("Reshape", g.op("Gather", g.const(np.cos(angles).astype(np.float32)), position), shape)
    sin = g.op("Reshape", g.op("Gather", g.const(np.sin(angles).astype(np.float32)), position), shape)
    return cos, sin


def linear(g: Graph, x: str, w: np.ndarray, fmt: str = "float") -> str:
    """x · w, w [in, out]: a float constant; integer weights behind a DequantizeLinear ("int8",
    "int4", "int4block32"); onnxruntime's MatMulNBits ("nbits", int4 in blocks of 32); or "qdq16",
    the QNN-native A16W8 form: uint16 activations in and out (fixed ranges of +-32 and +-64, no
    calibration) around int8 per-channel weights."""
    if fmt == "float":
        return g.op("MatMul", x, g.const(w))
    if fmt == "nbits":
        return matmul_nbits(g, x, w)
    if fmt == "qdq16":
        y = g.op("MatMul", qdq(g, x, 32 / 32768, np.uint16), dequantized(g, w, "int8"))
        return qdq(g, y, 64 / 32768, np.uint16)
    return g.op("MatMul", x, dequantized(g, w, fmt))


def matmul_nbits(g: Graph, x: str, w: np.ndarray) -> str:
    """com.microsoft MatMulNBits, the op edgellm's int4 bundles use: 4 bits, blocks of 32, zero point 8."""
    n_in, n_out = w.shape
    blocks = w.T.reshape(n_out, n_in // 32, 32)
    scale = np.abs(blocks).max(axis=2) / 7
    q = (np.clip(np.round(blocks / scale[..., None]), -8, 7) + 8).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return g.op("MatMulNBits", x, g.const(packed), g.const(scale.astype(np.float32).ravel()),
                domain="com.microsoft", K=n_in, N=n_out, bits=4, block_size=32)


def dequantized(g: Graph, w: np.ndarray, fmt: str) -> str:
    """w as integer weights + DequantizeLinear: int8/int4 per output channel, or int4 in blocks of 32
    along the input axis (opset 21's blocked quantization)."""
    bits = 8 if fmt.startswith("int8") else 4
    qmax = 2 ** (bits - 1) - 1
    qtype = np.int8
    if fmt.endswith("block32"):
        blocks = w.reshape(w.shape[0] // 32, 32, w.shape[1])
        scale = (np.abs(blocks).max(axis=1) / qmax).astype(np.float32)          # [in/32, out]
        q = np.clip(np.round(blocks / scale[:, None, :]), -qmax - 1, qmax).reshape(w.shape)
        zero = np.zeros(scale.shape, qtype)
        return g.op("DequantizeLinear", int_const(g, q, bits), g.const(scale), int_const(g, zero, bits),
                    axis=0, block_size=32)
    scale = (np.abs(w).max(axis=0) / qmax).astype(np.float32)                   # [out]
    q = np.clip(np.round(w / scale), -qmax - 1, qmax)
    return g.op("DequantizeLinear", int_const(g, q, bits), g.const(scale),
                int_const(g, np.zeros(scale.shape, qtype), bits), axis=1)


def int_const(g: Graph, q: np.ndarray, bits: int) -> str:
    if bits == 8:
        return g.const(q.astype(np.int8))
    name = f"c{len(g.inits)}"
    flat = q.astype(np.int8).ravel()
    g.inits.append(helper.make_tensor(name, TensorProto.INT4, q.shape, flat.tolist()))
    return name


def qdq(g: Graph, x: str, scale: float, dtype: Any) -> str:
    """Fake-quantize an activation: the QuantizeLinear/DequantizeLinear pair QNN reads as a quantized tensor."""
    zero = g.const(np.array(0 if dtype == np.int8 else np.iinfo(dtype).max // 2 + 1, dtype))
    s = g.const(np.float32(scale))
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, zero), s, zero)


def attention(g: Graph, q: str, k_all: str, v_all: str, mask: str, s: Shape, ctx: int, repeat: str) -> str:
    """Attention of one query row over `ctx` sequence-major rows [1, ctx, kv_heads, head_dim], from
    standard ops. repeat: "expand" repeats KV heads (Unsqueeze/Expand/Reshape), "tile" with Tile,
    "group" folds the query heads into [kv_heads, heads/kv_heads] and repeats nothing."""
    d, rep = s.head_dim, s.heads // s.kv_heads
    k = g.op("Transpose", k_all, perm=[0, 2, 3, 1])                              # [1, kvh, d, ctx]
    v = g.op("Transpose", v_all, perm=[0, 2, 1, 3])                              # [1, kvh, ctx, d]
    if repeat == "group":
        qh = g.op("Reshape", q, g.const(np.array([1, s.kv_heads, rep, d], np.int64)))
    else:
        qh = g.op("Reshape", q, g.const(np.array([1, s.heads, 1, d], np.int64)))
        if repeat == "expand":
            def rep_heads(t: str, shape: list[int]) -> str:
                e = g.op("Expand", g.op("Unsqueeze", t, g.const(np.array([2], np.int64))),
                         g.const(np.array([1, s.kv_heads, rep] + shape, np.int64)))
                return g.op("Reshape", e, g.const(np.array([1, s.heads] + shape, np.int64)))
        else:
            def rep_heads(t: str, shape: list[int]) -> str:
                tiled = g.op("Tile", t, g.const(np.array([1, 1, rep, 1], np.int64)))  # [1, kvh, rep*a, b]
                split = g.op("Reshape", tiled, g.const(np.array([1, s.kv_heads, rep] + shape, np.int64)))
                return g.op("Reshape", split, g.const(np.array([1, s.heads] + shape, np.int64)))
        k, v = rep_heads(k, [d, ctx]), rep_heads(v, [ctx, d])
    scores = g.op("Add", g.op("Mul", g.op("MatMul", qh, k), g.const(np.float32(d ** -0.5))), mask)
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    return g.op("Reshape", out, g.const(np.array([1, 1, s.hidden], np.int64)))


def decoder(s: Shape, past: int, fmt: str = "float", repeat: str = "group", norm: str = "std",
            seed: int = 0) -> onnx.ModelProto:
    """A one-token step of a Llama-style decoder with static shapes.

    Inputs: input_ids [1, 1] int64, position [1, 1] int64, mask [1, 1, 1, past+1] (0 for a row to
    attend, MASKED otherwise; the last column is the new token), past_key_i/past_value_i
    [1, past, kv_heads, head_dim] (the whole preallocated cache). Outputs: logits [1, 1, vocab],
    new_key_i/new_value_i [1, 1, kv_heads, head_dim], the rows the caller writes at `position`."""
    rng = np.random.default_rng(seed)
    d = s.head_dim
    g = Graph()
    ids = g.input("input_ids", np.int64, [1, 1])
    pos = g.input("position", np.int64, [1, 1])
    mask = g.input("mask", np.float32, [1, 1, 1, past + 1])
    embed = rng.normal(0, 1, (s.vocab, s.hidden)).astype(np.float32)
    x = g.op("Gather", g.const(embed), ids)                                       # [1, 1, hidden]
    cos, sin = rotary_tables(g, pos, d, past + 1)
    outputs = []

    def w(n_in: int, n_out: int) -> np.ndarray:
        return rng.normal(0, n_in ** -0.5, (n_in, n_out)).astype(np.float32)

    for i in range(s.layers):
        h = rms_norm(g, x, s.hidden, norm)
        q = g.op("Reshape", linear(g, h, w(s.hidden, s.hidden), fmt), g.const(np.array([1, 1, s.heads, d], np.int64)))
        kv_shape = g.const(np.array([1, 1, s.kv_heads, d], np.int64))
        k = g.op("Reshape", linear(g, h, w(s.hidden, s.kv_heads * d), fmt), kv_shape)
        v = g.op("Reshape", linear(g, h, w(s.hidden, s.kv_heads * d), fmt), kv_shape, out=f"new_value_{i}")
        q, k = rotary(g, q, cos, sin, d // 2), g.op("Identity", rotary(g, k, cos, sin, d // 2), out=f"new_key_{i}")
        outputs += [f"new_key_{i}", f"new_value_{i}"]
        k_all = g.op("Concat", g.input(f"past_key_{i}", np.float32, [1, past, s.kv_heads, d]), k, axis=1)
        v_all = g.op("Concat", g.input(f"past_value_{i}", np.float32, [1, past, s.kv_heads, d]), v, axis=1)
        att = attention(g, q, k_all, v_all, mask, s, past + 1, repeat)
        x = g.op("Add", x, linear(g, att, w(s.hidden, s.hidden), fmt))
        h = rms_norm(g, x, s.hidden, norm)
        gate = linear(g, h, w(s.hidden, s.inter), fmt)
        up = linear(g, h, w(s.hidden, s.inter), fmt)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        x = g.op("Add", x, linear(g, act, w(s.inter, s.hidden), fmt))
    h = rms_norm(g, x, s.hidden, norm)
    # An untied head: with a tied one a random model's residual stream keeps the input token's own
    # embedding on top, so it repeats its first token forever and every engine "agrees".
    g.op("MatMul", h, g.const(w(s.hidden, s.vocab)), out="logits")
    return g.model(["logits"] + outputs)


# ---------------------------------------------------------------------------- sessions

def register() -> Any:
    import onnxruntime_qnn
    if QNN not in {d.ep_name for d in ort.get_ep_devices()}:
        ort.register_execution_provider_library(QNN, onnxruntime_qnn.get_library_path())
    return onnxruntime_qnn


@dataclass
class Placement:
    qnn_nodes: int
    total_nodes: int
    partitions: int
    left: list[str]        # op types QNN did not take
    built: list[str]       # QNN op types it built


def qnn_session(path: Path, fallback: bool = True, fp16: bool = True) -> tuple[ort.InferenceSession, Placement]:
    """`path` on the QNN HTP backend; its placement read from QNN's framework op trace."""
    module = register()
    trace = Path(tempfile.mkdtemp(prefix="qnn-trace-"))
    options = {"backend_path": module.get_qnn_htp_path(), "soc_model": SOC_MODEL,
               "enable_htp_fp16_precision": "1" if fp16 else "0",
               "enable_framework_op_trace": "1", "framework_op_trace_dir": str(trace)}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices([d for d in ort.get_ep_devices() if d.ep_name == QNN][:1], options)
    session = ort.InferenceSession(str(path), so)
    files = list(trace.glob("*.json"))
    if not files:  # QNN took nothing, so it composed no graph and wrote no trace
        total = len(onnx.load(str(path), load_external_data=False).graph.node)
        return session, Placement(0, total, 0, ["(all)"], [])
    t = json.loads(files[0].read_text())
    # The trace's summary counts only some node units; its op mappings name every ONNX node QNN took.
    took = {src["name"] for sg in t["subgraph_traces"] for m in sg["op_mappings"] for src in m["sources"]
            if src["type"] == "OP"}
    unsupported = t.get("unsupported_nodes", [])
    left = sorted({n.get("op_type", n.get("type", "?")) for n in unsupported})
    built = sorted({m["dst_qnn_op_type"] for sg in t["subgraph_traces"] for m in sg["op_mappings"]})
    return session, Placement(len(took), len(took) + len(unsupported), t["summary"]["qnn_subgraphs"], left, built)


def cpu_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ms_per_run(session: ort.InferenceSession, feeds: dict, budget_s: float = 0.5) -> float:
    session.run(None, feeds)
    n, start = 0, time.perf_counter()
    while n < 3 or (time.perf_counter() - start < budget_s and n < 50):
        session.run(None, feeds)
        n += 1
    return (time.perf_counter() - start) / n * 1000


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# ---------------------------------------------------------------------------- probes

@dataclass
class Row:
    probe: str
    placed: str
    left: str
    built: str
    err: str
    qnn_ms: str
    cpu_ms: str
    note: str = ""


def save(model: onnx.ModelProto, work: Path, name: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9]+", "_", name)
    path = work / f"{name}.onnx"
    big = sum(t.ByteSize() for t in model.graph.initializer) > 1 << 30
    onnx.save(model, str(path), save_as_external_data=big, location=f"{name}.data" if big else None)
    return path


def run_probe(name: str, model: onnx.ModelProto, feeds: dict, work: Path, fp16: bool = True) -> Row:
    path = save(model, work, name)
    cpu = cpu_session(path)
    ref = cpu.run(None, feeds)
    try:
        session, p = qnn_session(path, fp16=fp16)
    except Exception as exc:  # noqa: BLE001 - a refusal is a finding
        return Row(name, "refused", "", "", "", "", f"{ms_per_run(cpu, feeds):.2f}", str(exc).splitlines()[0][:90])
    got = session.run(None, feeds)
    err = max(float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()) for a, b in zip(got, ref))
    scale = max(float(np.abs(b).max()) for b in ref)
    return Row(name, f"{p.qnn_nodes}/{p.total_nodes} in {p.partitions}", ",".join(p.left), ",".join(p.built),
               f"{err:.2g} (of {scale:.2g})", f"{ms_per_run(session, feeds):.2f}", f"{ms_per_run(cpu, feeds):.2f}")


def single(build: Callable[[Graph, str], str], shape: list[int], opset: int = 21,
           dtype: Any = np.float32, feed: np.ndarray | None = None) -> tuple[onnx.ModelProto, dict]:
    """A graph of one input `x` of `shape` and the one output `build` makes from it."""
    g = Graph(opset=opset)
    out = build(g, g.input("x", dtype, shape))
    g.op("Identity", out, out="y")
    x = feed if feed is not None else np.random.default_rng(1).normal(0, 1, shape).astype(dtype)
    return g.model(["y"]), {"x": x}


def op_probes(work: Path) -> list[Row]:
    rows = []
    rng = np.random.default_rng(2)
    for tag, s in (("tiny", TINY), ("smollm2", SMOLLM2)):
        hd, half, past = s.head_dim, s.head_dim // 2, 32
        x = [1, 1, s.hidden]
        rows.append(run_probe(f"rmsnorm std ops {tag}", *single(lambda g, x: rms_norm(g, x, s.hidden), x), work))
        rows.append(run_probe(f"rmsnorm RMSNormalization-23 {tag}",
                              *single(lambda g, x: rms_norm(g, x, s.hidden, "rms23"), x, opset=23), work))
        rows.append(run_probe(f"rmsnorm SimplifiedLayerNormalization {tag}",
                              *single(lambda g, x: rms_norm(g, x, s.hidden, "simplified"), x), work))
        embed = rng.normal(0, 1, (s.vocab, s.hidden)).astype(np.float32)
        ids = np.array([[s.vocab - 7]], np.int64)
        rows.append(run_probe(f"embedding Gather int64 ids {tag}",
                              *single(lambda g, x: g.op("Gather", g.const(embed), x), [1, 1], dtype=np.int64,
                                      feed=ids), work))
        rows.append(run_probe(f"embedding Gather int32 ids {tag}",
                              *single(lambda g, x: g.op("Gather", g.const(embed), x), [1, 1], dtype=np.int32,
                                      feed=ids.astype(np.int32)), work))

        def rope(g: Graph, x: str) -> str:
            cos, sin = rotary_tables(g, g.const(np.array([[17]], np.int64)), hd, 64)
            return rotary(g, x, cos, sin, half)
        rows.append(run_probe(f"rotary std ops {tag}", *single(rope, [1, 1, s.heads, hd]), work))

        def rope23(g: Graph, x: str) -> str:
            freq = 1.0 / (10000.0 ** (np.arange(half) / half))
            ang = np.outer(np.arange(64), freq)
            return g.op("RotaryEmbedding", x, g.const(np.cos(ang).astype(np.float32)),
                        g.const(np.sin(ang).astype(np.float32)), g.const(np.array([[17]], np.int64)),
                        num_heads=s.heads)
        rows.append(run_probe(f"rotary RotaryEmbedding-23 {tag}", *single(rope23, [1, 1, s.hidden], opset=23),
                              work))
        for repeat in ("expand", "tile", "group"):
            g = Graph()
            q = g.input("q", np.float32, [1, 1, s.heads, hd])
            k = g.input("k", np.float32, [1, past + 1, s.kv_heads, hd])
            v = g.input("v", np.float32, [1, past + 1, s.kv_heads, hd])
            m = g.input("mask", np.float32, [1, 1, 1, past + 1])
            g.op("Identity", attention(g, q, k, v, m, s, past + 1, repeat), out="y")
            mask = np.zeros((1, 1, 1, past + 1), np.float32)
            mask[..., 20:past] = MASKED
            feeds = {"q": rng.normal(0, 1, (1, 1, s.heads, hd)).astype(np.float32),
                     "k": rng.normal(0, 1, (1, past + 1, s.kv_heads, hd)).astype(np.float32),
                     "v": rng.normal(0, 1, (1, past + 1, s.kv_heads, hd)).astype(np.float32), "mask": mask}
            rows.append(run_probe(f"attention past {past}+mask, kv {repeat} {tag}", g.model(["y"]), feeds, work))
        gate_up = rng.normal(0, s.hidden ** -0.5, (s.hidden, s.inter)).astype(np.float32)

        def silu(g: Graph, x: str) -> str:
            h = g.op("MatMul", x, g.const(gate_up))
            return g.op("Mul", h, g.op("Sigmoid", h))
        rows.append(run_probe(f"MatMul+SiLU (Sigmoid*Mul) {tag}", *single(silu, x), work))
        rows.append(run_probe(f"Softmax over vocab {tag}",
                              *single(lambda g, x: g.op("Softmax", x, axis=-1), [1, 1, s.vocab]), work))
        rows.append(run_probe(f"lm head MatMul {s.hidden}x{s.vocab} {tag}",
                              *single(lambda g, x: g.op("MatMul", x, g.const(np.ascontiguousarray(embed.T))), x),
                              work))
    return rows


def weight_probes(work: Path) -> list[Row]:
    rng = np.random.default_rng(3)
    n_in, n_out = SMOLLM2.hidden, SMOLLM2.inter
    w = rng.normal(0, n_in ** -0.5, (n_in, n_out)).astype(np.float32)
    shape = [1, 1, n_in]
    rows = [run_probe("MatMul fp32 weights, fp16 precision", *single(lambda g, x: linear(g, x, w), shape), work),
            run_probe("MatMul fp32 weights, fp16 precision off", *single(lambda g, x: linear(g, x, w), shape), work,
                      fp16=False)]

    def fp16_graph(g: Graph, x: str) -> str:
        return g.op("MatMul", x, g.const(w.astype(np.float16)))
    rows.append(run_probe("MatMul fp16 graph (fp16 in, weights)", *single(fp16_graph, shape, dtype=np.float16), work))
    for fmt in ("int8", "int4", "int4 block32"):
        rows.append(run_probe(f"DQ({fmt.replace(' ', ', ')}{'' if 'block' in fmt else ' per-channel'})+MatMul, "
                              "float act", *single(lambda g, x: linear(g, x, w, fmt.replace(" ", "")), shape), work))

    rows.append(run_probe("ms:MatMulNBits int4 block32", *single(lambda g, x: linear(g, x, w, "nbits"), shape), work))
    for act, wt, per_channel in ((np.uint8, np.uint8, False), (np.uint16, np.uint8, False),
                                 (np.uint16, np.int8, True), (np.uint8, np.int8, True)):
        def full_qdq(g: Graph, x: str) -> str:
            xq = qdq(g, x, 4.0 / 2 ** (8 * np.dtype(act).itemsize - 1), act)
            if per_channel:
                wd = dequantized(g, w, "int8")
            else:
                scale = np.float32(np.abs(w).max() / 127)
                q = (np.clip(np.round(w / scale), -127, 127) + 128).astype(np.uint8)
                wd = g.op("DequantizeLinear", g.const(q), g.const(scale), g.const(np.uint8(128)))
            return qdq(g, g.op("MatMul", xq, wd), 8.0 / 2 ** (8 * np.dtype(act).itemsize - 1), act)
        name = (f"QDQ act {np.dtype(act).name}, weights {np.dtype(wt).name} "
                f"{'per-channel' if per_channel else 'per-tensor'}")
        rows.append(run_probe(name, *single(full_qdq, shape), work))
    g = Graph()
    g.op("MatMul", g.input("x", np.float32, ["seq", n_in]), g.const(w), out="y")
    rows.append(run_probe("MatMul, dynamic dim 'seq'", g.model(["y"]),
                          {"x": rng.normal(0, 1, (3, n_in)).astype(np.float32)}, work))
    return rows


class Stepper:
    """Greedy one-token steps over one session of a `decoder` graph, keeping the cache in numpy."""

    def __init__(self, session: ort.InferenceSession, s: Shape, past: int) -> None:
        self.session, self.s, self.past = session, s, past
        self.cache = {f"past_{kind}_{i}": np.zeros((1, past, s.kv_heads, s.head_dim), np.float32)
                      for i in range(s.layers) for kind in ("key", "value")}
        self.names = [o.name for o in session.get_outputs()]

    def step(self, token: int, pos: int) -> np.ndarray:
        mask = np.full((1, 1, 1, self.past + 1), MASKED, np.float32)
        mask[..., :pos] = 0
        mask[..., -1] = 0
        out = dict(zip(self.names, self.session.run(None, {"input_ids": np.array([[token]], np.int64),
                                                          "position": np.array([[pos]], np.int64),
                                                          "mask": mask, **self.cache})))
        for i in range(self.s.layers):
            for kind in ("key", "value"):
                self.cache[f"past_{kind}_{i}"][:, pos] = out[f"new_{kind}_{i}"][:, 0]
        return out["logits"].reshape(-1)

    def greedy(self, first: int, steps: int) -> tuple[list[int], list[np.ndarray]]:
        tokens, logits = [first], []
        for pos in range(steps):
            logits.append(self.step(tokens[-1], pos))
            tokens.append(int(logits[-1].argmax()))
        return tokens[1:], logits


def decoder_row(name: str, s: Shape, past: int, work: Path, steps: int, **build: Any) -> Row:
    path = save(decoder(s, past, **build), work, name)
    before = rss_mb()
    try:
        start = time.perf_counter()
        session, p = qnn_session(path, fallback=False)
        compile_s = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - a refusal is a finding; say what QNN would leave to the CPU
        _, p = qnn_session(path)
        return Row(name, f"refused without fallback; with: {p.qnn_nodes}/{p.total_nodes} in {p.partitions}",
                   ",".join(p.left), "", "", "", "", str(exc).splitlines()[0].split(" : ")[-1][:80])
    grown = rss_mb() - before
    qnn, cpu = Stepper(session, s, past), Stepper(cpu_session(path), s, past)
    start = time.perf_counter()
    got_tokens, got = qnn.greedy(1, steps)
    qnn_ms = (time.perf_counter() - start) / steps * 1000
    start = time.perf_counter()
    ref_tokens, ref = cpu.greedy(1, steps)
    cpu_ms = (time.perf_counter() - start) / steps * 1000
    same = sum(a == b for a, b in zip(got_tokens, ref_tokens))
    # Logit error on the CPU's own path, so a parted token cannot inflate it: one more QNN pass teacher-forced.
    forced = Stepper(session, s, past)
    err = max(float(np.abs(forced.step(t, pos) - r).max())
              for pos, (t, r) in enumerate(zip([1] + ref_tokens[:-1], ref)))
    scale = max(float(np.abs(r).max()) for r in ref)
    return Row(name, f"{p.qnn_nodes}/{p.total_nodes} in {p.partitions}, no fallback", ",".join(p.left), "",
               f"{err:.2g} (of {scale:.2g})", f"{qnn_ms:.1f}", f"{cpu_ms:.1f}",
               f"greedy {same}/{steps} same ({len(set(ref_tokens))} distinct); compile {compile_s:.1f} s; "
               f"RSS +{grown:.0f} MiB")


def decoder_probes(work: Path, past: int, steps: int = 16) -> list[Row]:
    rows = [decoder_row(f"tiny decoder {TINY.layers}L past {past}, fp32 weights", TINY, past, work, steps)]
    rows.append(decoder_row(f"tiny decoder {TINY.layers}L past {past}, kv expand", TINY, past, work, steps,
                            repeat="expand"))
    for fmt, what in (("int8", "int8 per-channel DQ weights"), ("nbits", "ms:MatMulNBits int4"),
                      ("qdq16", "QDQ uint16 act, int8 weights")):
        rows.append(decoder_row(f"tiny decoder {TINY.layers}L past {past}, {what}", TINY, past, work, steps, fmt=fmt))
    return rows


def smollm2_probes(work: Path, past: int, layers: int, formats: list[str], steps: int = 4) -> list[Row]:
    s = Shape(**{**SMOLLM2.__dict__, "layers": layers})
    what = {"float": "fp32 weights", "nbits": "ms:MatMulNBits int4", "qdq16": "QDQ uint16 act, int8 weights"}
    return [decoder_row(f"SmolLM2 sizes {layers}L past {past}, {what[fmt]}", s, past, work, steps, fmt=fmt)
            for fmt in formats]


# ---------------------------------------------------------------------------- main

def table(rows: list[Row]) -> str:
    head = ("probe", "QNN nodes / all", "left to CPU", "QNN ops built", "max abs err vs CPU", "QNN ms/run",
            "CPU ms/run", "note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.__dict__.values()) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probes", default="ops,weights,decoder",
                   help="comma list of: ops, weights, decoder, smollm2 (default ops,weights,decoder)")
    p.add_argument("--past", type=int, default=32, help="static past rows of the decoder probes (default 32)")
    p.add_argument("--layers", type=int, default=1, help="layers of the SmolLM2-sized decoder (default 1; 30 is all)")
    p.add_argument("--smollm2-past", type=int, default=128, help="static past rows at SmolLM2 sizes (default 128)")
    p.add_argument("--smollm2-weights", default="float,nbits",
                   help="weight formats at SmolLM2 sizes: float, nbits, qdq16 (default float,nbits)")
    args = p.parse_args(argv)
    try:
        register()
    except ImportError:
        print('onnxruntime-qnn is not installed (pip install "edgellm[qnn]")', file=sys.stderr)
        return 2
    chosen = [name.strip() for name in args.probes.split(",") if name.strip()]
    with tempfile.TemporaryDirectory(prefix="qnn-probe-") as tmp:
        work = Path(tmp)
        runs = {"ops": lambda: op_probes(work), "weights": lambda: weight_probes(work),
                "decoder": lambda: decoder_probes(work, args.past),
                "smollm2": lambda: smollm2_probes(work, args.smollm2_past, args.layers,
                                                  args.smollm2_weights.split(","))}
        for name in chosen:
            if name not in runs:
                p.error(f"--probes: unknown probe group {name!r} (have {', '.join(runs)})")
        for name in chosen:
            start = time.perf_counter()
            print(f"\n## {name}\n\n{table(runs[name]())}\n\n({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

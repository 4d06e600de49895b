"""GGUF blocks kept at the GGUF's own cost where onnxruntime's formats allow, and still exact.

MatMulNBits takes its scales in the activations' dtype (float32 on the CPU) while GGUF's are
float16: the graph holds them as float16 and casts them, a Cast onnxruntime folds at load
before the kernel prepacks. The weight each graph computes with is checked against gguf-py's
own dequantization of the same bytes (an identity matrix through the layer reads it out).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from onnx import TensorProto, helper

from edgellm.export.config import QuantConfig
from edgellm.export.gguf_blocks import from_gguf_blocks
from edgellm.export.graph import OPSET
from edgellm.export.linear import Writer, apply_linear, quantized_linear
from edgellm.export.sources import QuantBlocks
from gguf_writer import blocks as gguf_blocks

N, K = 24, 512  # two K-quant super-blocks a row
# GGUF type -> (how its scales are stored, bundle bytes per GGUF block where there are no
# offsets). float16: Q4_0 costs what it costs in the GGUF (18 bytes per 32 values). factored: a
# 4-bit K-quant's float16 super-block scale and int8 sub-block scales, as in the GGUF. float32: an
# 8-bit weight's scales, which onnxruntime would keep resident once folded though its kernel reads
# its packed copy (linear.py): Q8_0 and Q5_0 36 bytes per 32 where the GGUF has 34 and 22, Q6_K in
# its own block-16 form 256 + 64 where the GGUF has 210 (the export reads it at block 64).
STORED = {
    Q.Q4_0: ("float16", 18), Q.Q8_0: ("float32", 36), Q.Q4_1: ("float16", None), Q.Q5_0: ("float32", 36),
    Q.Q5_1: ("float32", None), Q.Q4_K: ("factored", None), Q.Q5_K: ("float32", None), Q.Q6_K: ("float32", 320),
}


def _layer(kind: Q, quant: QuantConfig, tmp: Path) -> tuple[Path, np.ndarray, list[TensorProto]]:
    """One linear layer of `kind` blocks as the graph builder writes it; gguf-py's weight."""
    rng = np.random.default_rng(7)
    raw = gguf_blocks((rng.normal(size=(N, K)) + 0.5).astype(np.float32), kind, 7)
    tmp.mkdir()
    w = Writer(tmp / "w.data")
    lin = quantized_linear(w, "layer", from_gguf_blocks(QuantBlocks(kind.name, (N, K), raw)), None, quant)
    apply_linear(w, "/layer", "x", lin, quant, out="y")
    w.close()
    graph = helper.make_graph(w.nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], w.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    onnx.save_model(helper.make_model(graph, opset_imports=opsets, ir_version=10), tmp / "m.onnx")
    return tmp / "m.onnx", gguf_dequantize(raw, kind).reshape(N, K), w.initializers


def _stored_bytes(inits: list[TensorProto], prefix: str) -> dict[str, int]:
    return {t.name: int(next((e.value for e in t.external_data if e.key == "length"), len(t.raw_data)))
            for t in inits if t.name.startswith(prefix)}


@pytest.mark.parametrize("kind", list(STORED), ids=[k.name for k in STORED])
def test_the_graph_computes_with_the_gguf_weight(kind, tmp_path):
    """fp32 activations: x = I gives W^T itself, equal to gguf-py's weight (offset types: up to
    float32 rounding of scale*(q - middle) + offset)."""
    model, expected, _ = _layer(kind, QuantConfig(accuracy_level=0), tmp_path / "l0")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.eye(K, dtype=np.float32)[None]})
    if kind in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q6_K):  # no offsets: equal
        assert np.array_equal(y[0].T, expected)
    else:
        np.testing.assert_allclose(y[0].T, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("kind", list(STORED), ids=[k.name for k in STORED])
def test_scales_are_stored_as_listed_and_float32_at_load(kind, tmp_path):
    """4-bit weights keep the GGUF's scale width in the file, 8-bit ones float32 (STORED says why)."""
    form, per_block = STORED[kind]
    model, _, inits = _layer(kind, QuantConfig(), tmp_path / "l4")
    stored = _stored_bytes(inits, "layer.")
    dtypes = {t.name: t.data_type for t in inits}
    scales = {"float16": {"layer.scales.float16": TensorProto.FLOAT16}, "float32": {"layer.scales": TensorProto.FLOAT},
              "factored": {"layer.scales.super.float16": TensorProto.FLOAT16, "layer.scales.sub.int8": TensorProto.INT8}}
    assert {k: v for k, v in dtypes.items() if k.startswith("layer.scales")} == scales[form], dtypes
    if per_block is not None:
        values, nbytes = GGML_QUANT_SIZES[kind]
        assert sum(stored.values()) == N * K // values * per_block, (stored, nbytes)
    # The default (int8 activations) session sees float32 constants: the Cast (and the Concat
    # with the offset digits' scales) are folded when the graph is loaded, so MatMulNBits
    # prepacks them as before.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx", load_external_data=False).graph
    constants = {t.name: t.data_type for t in optimized.initializer}
    matmul = next(n for n in optimized.node if n.op_type == "MatMulNBits")
    assert constants.get(matmul.input[2]) == TensorProto.FLOAT
    assert not any(n.op_type == "Cast" for n in optimized.node)

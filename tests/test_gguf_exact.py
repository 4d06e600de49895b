"""Exact import of GGUF Q4_0 / Q4_1 / Q8_0 blocks: no second rounding, down to 1e-5.

The reference is always gguf-py's own dequantization (or the fp32 graph built from
it), so a slip in nibble order, scales, offsets or fused rows shows as a mismatch.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from onnx import TensorProto, helper

from export.config import QuantConfig
from export.gguf import open_gguf
from export.graph import OPSET, build_fast_graph
from export.linear import Writer, apply_linear, quantized_linear
from export.quantize import QuantizedWeight, dequantize, from_gguf_blocks, offset_blocks, unpack
from export.sources import QuantBlocks
from gguf_writer import write_tiny_gguf
from ort_loop import FastGraphRunner

PROMPT = [5, 17, 33, 100, 7, 250, 3]
EXACT = QuantConfig(accuracy_level=0)  # int4, block 32: fp32 activations, so only summation order differs
# Every linear weight in a type the import takes: a mixed Q4_1/Q4_0/Q8_0 fused QKV
# (widened to 8 bits), a Q4_1 tied embedding (offsets on the gather and on lm_head).
TIED_QTYPES = {
    "embed_tokens.weight": Q.Q4_1,
    "self_attn.q_proj.weight": Q.Q4_1,
    "self_attn.k_proj.weight": Q.Q4_0,
    "self_attn.v_proj.weight": Q.Q8_0,
    "self_attn.o_proj.weight": Q.Q4_0,
    "mlp.gate_proj.weight": Q.Q4_1,
    "mlp.up_proj.weight": Q.Q4_0,
    "mlp.down_proj.weight": Q.Q8_0,
}
# Untied, with biases: an untied Q4_1 embedding reads offsets from its own table.
UNTIED_QTYPES = {
    "embed_tokens.weight": Q.Q4_1,
    "lm_head.weight": Q.Q8_0,
    "self_attn.q_proj.weight": Q.Q4_1,
    "self_attn.k_proj.weight": Q.Q4_1,
    "self_attn.v_proj.weight": Q.Q4_1,
    "self_attn.o_proj.weight": Q.Q4_1,
    "mlp.gate_proj.weight": Q.Q4_0,
    "mlp.up_proj.weight": Q.Q4_0,
    "mlp.down_proj.weight": Q.Q4_1,
}


def _blocks(kind: Q, n: int = 48, k: int = 96, seed: int = 0) -> tuple[QuantBlocks, np.ndarray]:
    """Random weights stored as `kind` blocks, and gguf-py's dequantization of them."""
    rng = np.random.default_rng(seed)
    # A shifted distribution, so Q4_1's minimum is far from zero and offsets matter.
    w = (rng.normal(size=(n, k)) + 0.7).astype(np.float32)
    raw = gguf_quantize(w, kind)
    return QuantBlocks(kind.name, (n, k), raw), gguf_dequantize(raw, kind).reshape(n, k)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
@pytest.mark.parametrize("bits", [None, 8])
def test_blocks_dequantize_like_gguf(kind, bits):
    blocks, expected = _blocks(kind)
    q = from_gguf_blocks(blocks, bits)
    assert q.bits == (bits or (8 if kind == Q.Q8_0 else 4)) and q.block_size == 32 and q.zero_points is None
    assert (q.offsets is not None) == (kind == Q.Q4_1)
    # Q4_1 is regrouped as d*(q - 8) + (m + 8d): equal up to float32 rounding.
    np.testing.assert_allclose(dequantize(q), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    if kind != Q.Q4_1:
        assert np.array_equal(dequantize(q), expected)


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("n_blocks", [3, 48])
def test_offset_blocks_carry_the_offsets(bits, n_blocks):
    """The extra blocks, read against block sums, add the offsets to within (1/14)^3 / 2 of the largest."""
    blocks, _ = _blocks(Q.Q4_1, n=40, k=32 * n_blocks, seed=3)
    q = from_gguf_blocks(blocks, bits)
    packed, scales = offset_blocks(q)
    width = -(-n_blocks // 32) * 32
    assert packed.shape[1] * 32 == 3 * width and scales.shape == (40, 3 * width // 32)
    extra = QuantizedWeight(packed=packed, scales=scales, zero_points=None, bits=q.bits, block_size=32,
                            K=3 * width, N=40)
    assert unpack(extra).max() <= (15 if q.bits == 4 else 255)
    per_column = dequantize(extra).reshape(40, 3, width)
    carried = per_column.sum(axis=1)[:, :n_blocks]
    np.testing.assert_allclose(carried, q.offsets, rtol=0, atol=3.7e-4 * np.abs(q.offsets).max())
    assert np.all(per_column[:, :, n_blocks:] == 0)


def _one_linear(q, level: int, tmp: Path) -> ort.InferenceSession:
    """One linear layer exactly as the graph builder lays it out, offsets included."""
    tmp.mkdir()
    w = Writer(tmp / "w.data")
    lin = quantized_linear(w, "layer", q, None, QuantConfig(accuracy_level=level))
    apply_linear(w, "/layer", "x", lin, QuantConfig(accuracy_level=level), out="y")
    w.close()
    graph = helper.make_graph(
        w.nodes, "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", q.K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        w.initializers,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    onnx.save_model(helper.make_model(graph, opset_imports=opsets, ir_version=10), tmp / "m.onnx")
    return ort.InferenceSession(str(tmp / "m.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_one_layer_matches_numpy(kind, tmp_path):
    blocks, w = _blocks(kind, n=40, k=128, seed=1)
    x = np.random.default_rng(2).normal(size=(1, 3, 128)).astype(np.float32)
    expected = x.astype(np.float64) @ w.T.astype(np.float64)
    (y,) = _one_linear(from_gguf_blocks(blocks), 0, tmp_path / "l0").run(None, {"x": x})
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # int8 activations (the default level 4) stay close, offsets included.
    (y4,) = _one_linear(from_gguf_blocks(blocks), 4, tmp_path / "l4").run(None, {"x": x})
    np.testing.assert_allclose(y4, expected, rtol=0, atol=2e-2 * np.abs(expected).max())


def _export(path, out, quant: QuantConfig, **kw):
    source = open_gguf(path)
    out.mkdir()
    info = build_fast_graph(source, quant, out, **kw)
    return out / "model.onnx", source.spec, info


@pytest.mark.parametrize("arch,qtypes,model_kw", [
    ("llama", TIED_QTYPES, {}),
    ("qwen2", UNTIED_QTYPES, {"tie_embeddings": False}),
])
# int8 activations (the default) carry Q4_1's offsets as extra blocks, fp32 ones as a float MatMul;
# int8 rounding alone moves these logits by up to 3.5% of the largest (measured without the blocks).
@pytest.mark.parametrize("quant,atol", [(EXACT, 1e-5), (QuantConfig(), 5e-2)])
def test_exported_graph_equals_dequantized_gguf(arch, qtypes, model_kw, quant, atol, tiny_hf, tmp_path):
    path = write_tiny_gguf(tiny_hf(arch, **model_kw), tmp_path / "m.gguf", qtypes)
    exact, spec, info = _export(path, tmp_path / "int4", quant)
    reference, _, _ = _export(path, tmp_path / "fp32", QuantConfig(weights="fp32"))
    tokens, ref_logits = FastGraphRunner(reference, spec).greedy(PROMPT, 8)
    logits = FastGraphRunner(exact, spec).teacher_forced(PROMPT, tokens)
    ref = np.stack(ref_logits)
    np.testing.assert_allclose(np.stack(logits), ref, rtol=0, atol=atol * np.abs(ref).max())
    imported: dict[str, int] = {}
    for match in filter(None, (re.match(r"imported (\d+) (\w+) tensors? exactly", n) for n in info.notes)):
        imported[match[2]] = imported.get(match[2], 0) + int(match[1])
    expected: dict[str, int] = {}
    for suffix, kind in qtypes.items():
        once = "embed" in suffix or "lm_head" in suffix
        expected[kind.name] = expected.get(kind.name, 0) + (1 if once else spec.num_layers)
    assert imported == expected, info.notes
    assert not any(note.startswith(("quantized", "re-quantized")) for note in info.notes), info.notes


def test_other_types_and_requests_are_requantized_and_said_so(tiny_hf, tmp_path):
    qtypes = {"self_attn.q_proj.weight": Q.Q5_0, "mlp.gate_proj.weight": Q.Q4_1, "mlp.up_proj.weight": Q.Q8_0}
    path = write_tiny_gguf(tiny_hf("llama"), tmp_path / "m.gguf", qtypes)
    _, _, info = _export(path, tmp_path / "default", QuantConfig())
    assert "re-quantized 2 Q5_0 tensors to int4 block 32 symmetric" in info.notes
    assert any(n.startswith("quantized 9 F32 tensors to int4 block 32") for n in info.notes), info.notes
    assert any(n.startswith("imported 2 Q4_1 tensors exactly as int8") and "widened" in n for n in info.notes)
    assert any(n.startswith("imported 2 Q8_0 tensors exactly as int8") and "kept at 8 bits" in n for n in info.notes)
    _, _, info = _export(path, tmp_path / "b64", QuantConfig(block_size=64))
    assert "re-quantized 2 Q4_1 tensors to int4 block 64 symmetric" in info.notes
    assert not any(n.startswith("imported") for n in info.notes)
    _, _, info = _export(path, tmp_path / "req", QuantConfig(symmetric=False), requantize=True)
    assert "re-quantized 2 Q8_0 tensors to int4 block 32 asymmetric" in info.notes
    graph = onnx.load(tmp_path / "req" / "model.onnx", load_external_data=False).graph
    assert not any(n.name.endswith("/offsets/Add") for n in graph.node)


@pytest.mark.slow
def test_smollm2_default_export_keeps_its_quality(smollm2_bundle):
    """The shipped Q4_1 GGUF, exported with the defaults: its own blocks, perplexity within 5%."""
    manifest = json.loads((smollm2_bundle / "manifest.json").read_text())
    notes = manifest["quantization"]["notes"]
    assert any(n.startswith("imported 210 Q4_1 tensors exactly as int4") for n in notes), notes
    assert any(n.startswith("imported 1 Q8_0 tensor exactly as int8") for n in notes), notes
    quality = manifest["quality"]
    assert quality["passed"] and quality["ratio"] <= 1.05, quality

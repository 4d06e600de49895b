"""Quality where the bundle runs: offsets that survive an aarch64 kernel's rounding, and
benchmarks/arm64_quality.py scoring the gate's own tokens.

The emulated measurement needs a prepared Debian arm64 root (devices/arm64-check.sh
--prepare ROOT), root rights and qemu; it runs only when EDGELLM_ARM64_ROOT names such a
root, and takes minutes (CI skips it, saying why).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as Q
from onnx import TensorProto, helper, numpy_helper

from edgellm.export.config import QuantConfig
from edgellm.export.gguf_blocks import from_gguf_blocks
from edgellm.export.graph import OPSET
from edgellm.export.linear import Writer, apply_linear, quantized_linear
from edgellm.export.quantize import dequantize
from edgellm.export.sources import QuantBlocks
from edgellm.runtime import providers
from edgellm.runtime.bundle import read_manifest
from gguf_writer import blocks as gguf_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import arm64_quality  # noqa: E402


def test_folded_offsets_keep_aarch64_activations_per_block(tmp_path, monkeypatch):
    """onnxruntime's aarch64 build runs a symmetric int4 MatMulNBits (no zero points) with
    KleidiAI's kernel on a CPU with int8 dot product (Cortex-A76, a Pi 5), which quantizes a
    whole row of activations with one int8 scale; the block sums the folded offsets read then
    lose too much (the default SmolLM2 bundle: 1.071x its source's perplexity there, 1.004x on
    MLAS's own kernel). The graph says it reads block sums and the runtime keeps such a graph on
    MLAS there, nowhere else, and no other graph. A Q4_1 linear laid out as the export lays it:"""
    n, k = 48, 576
    w = np.random.default_rng(0).normal(scale=0.05, size=(n, k)).astype(np.float32)
    q = from_gguf_blocks(QuantBlocks("Q4_1", (n, k), gguf_blocks(w, Q.Q4_1)))
    quant = QuantConfig()
    writer = Writer(tmp_path / "w.data")
    assert not writer.block_sums
    lin = quantized_linear(writer, "layer", q, None, quant)
    apply_linear(writer, "/layer", "x", lin, quant, out="y")
    writer.close()
    node = next(node for node in writer.nodes if node.op_type == "MatMulNBits")
    assert lin.folded and writer.block_sums
    assert len(node.input) <= 3 or not node.input[3]  # no zero points: 4.0 bits a code, not 4.125
    key = "mlas.disable_kleidiai"
    for machine, block_sums, kept in (("aarch64", True, True), ("aarch64", False, False), ("x86_64", True, False)):
        monkeypatch.setattr(providers.platform, "machine", lambda machine=machine: machine)
        options = providers.session_options(2, block_sums)
        if kept:
            assert options.get_session_config_entry(key) == "1"
        else:
            with pytest.raises(Exception, match=key):
                options.get_session_config_entry(key)
    # ... and it is still the same weight: the product is the dequantized one's, to int8 rounding.
    graph = helper.make_graph(writer.nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], writer.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    onnx.save_model(helper.make_model(graph, opset_imports=opsets, ir_version=10), tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(size=(1, 4, k)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    expected = x.astype(np.float64) @ dequantize(q).T.astype(np.float64)
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-2 * np.abs(expected).max())


def test_the_host_score_is_the_export_gate_s(smollm2_bundle):
    """The benchmark scores the tokens the gate scored, so its x86 column is the manifest's figure."""
    manifest = read_manifest(smollm2_bundle, verify=False)
    ids = arm64_quality.gate_ids(smollm2_bundle)
    assert len(ids) == manifest.quality["tokens"]
    got = arm64_quality.measure(smollm2_bundle, ids, 2, {})["perplexity"]
    assert got == pytest.approx(manifest.quality["perplexity"], abs=1e-3)
    assert manifest.graph.block_sums  # the exact Q4_1 import's offsets ride as block sums


def test_it_says_why_it_cannot_run(monkeypatch, capsys):
    monkeypatch.delenv("EDGELLM_ARM64_ROOT", raising=False)
    assert arm64_quality.main(["some-bundle"]) == arm64_quality.SKIPPED
    assert "skipped: no arm64 root named (--root or EDGELLM_ARM64_ROOT)" in capsys.readouterr().err


ROOT = os.environ.get("EDGELLM_ARM64_ROOT")


@pytest.mark.skipif(ROOT is None, reason="EDGELLM_ARM64_ROOT names no prepared arm64 root (minutes under qemu)")
def test_smollm2_default_bundle_holds_its_gate_on_a_pi_5(smollm2_bundle, capsys):
    reason = arm64_quality.unavailable(Path(ROOT), build=False)
    if reason:
        pytest.skip(reason)
    code = arm64_quality.main([str(smollm2_bundle), "--root", ROOT, "--cpu", "cortex-a76", "--no-install"])
    out = capsys.readouterr().out
    assert code == 0, out

"""`--target qnn`: a static-shape, one-token-step graph (export/qnn.py) and its runner (edgellm/runtime/runner.py OneTokenRunner).

On the CPU provider the graph must answer as transformers does, family by family, and
its int4 form as the cpu graph of the same weights. Where onnxruntime-qnn is installed,
the same graph runs on QNN's HTP backend (a simulator on x86-64) with CPU fallback
disabled, so the session exists only if every node is on the HTP in one partition, and
its greedy tokens must be the CPU provider's.
"""
from __future__ import annotations

import collections
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgellm.runtime.bundle import read_manifest
from edgellm.errors import BundleError, ExportError, GenerationError
from edgellm.runtime.caches import FixedCache, StaticCache
from edgellm.runtime.providers import create_session
from edgellm.runtime.runner import OneTokenRunner, Runner
from edgellm.export.config import QuantConfig
from edgellm.export.graph import build_fast_graph
from edgellm.export.hf import open_hf_folder
from edgellm.export.qnn import build_qnn_graph
from test_graph import PROMPT, hf_greedy, hf_model
from test_openvino_target import CASES, _greedy  # the prompt in two chunks, then greedy steps

STEPS = 16
CONTEXT = 32  # PROMPT + STEPS fit; gemma3's window of 4 is narrower


def _export(folder: Path, out: Path, context: int = CONTEXT, **quant) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    build_qnn_graph(open_hf_folder(folder), QuantConfig(**quant, target="qnn", context=context), out)
    return out / "model.onnx"


@pytest.mark.parametrize("case", CASES)
def test_qnn_graph_matches_transformers(case, tiny_hf, tmp_path):
    arch, kw = CASES[case]
    folder = tiny_hf(arch, **kw)
    path = _export(folder, tmp_path, weights="fp32")
    ref_tokens, ref_logits = hf_greedy(hf_model(folder), PROMPT, STEPS)
    tokens, logits = _greedy(OneTokenRunner(create_session(path, threads=1)), PROMPT)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)


def test_qnn_graph_is_static_and_plain(tiny_hf, tmp_path):
    """Every shape fixed, int32 ids, and no contrib op but MatMulNBits: what QNN compiles whole."""
    path = _export(tiny_hf("qwen3", tie_embeddings=False), tmp_path, weights="int4")
    graph = onnx.load(path, load_external_data=False).graph
    for v in [*graph.input, *graph.output]:
        assert all(d.dim_value > 0 and not d.dim_param for d in v.type.tensor_type.shape.dim), v.name
    types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    assert types["input_ids"] == types["position_ids"] == onnx.TensorProto.INT32
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    assert shapes["past_key_values.1.value"] == [1, CONTEXT, 2, 16] and shapes["present.1.value"] == [1, 1, 2, 16]
    ops = collections.Counter(n.op_type for n in graph.node)
    assert {n.op_type for n in graph.node if n.domain == "com.microsoft"} == {"MatMulNBits"}
    assert ops["Softmax"] == 2 and "Expand" not in ops and "Tile" not in ops  # KV heads never repeated
    assert not {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"} & set(ops)


def test_qnn_int4_graph_equals_the_cpu_graph(tiny_hf, tmp_path):
    """MatMulNBits at float activations and the dequantized embedding table answer as the cpu
    graph of the same int4 weights (its gathered embedding) at accuracy level 0."""
    folder = tiny_hf("qwen2", tie_embeddings=False)
    quant = dict(weights="int4", accuracy_level=0, block_size=32)
    path = _export(folder, tmp_path / "qnn", **quant)
    (tmp_path / "cpu").mkdir()
    build_fast_graph(open_hf_folder(folder), QuantConfig(**quant), tmp_path / "cpu")
    spec = open_hf_folder(folder).spec
    cache = StaticCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, CONTEXT)
    cpu = Runner(create_session(tmp_path / "cpu" / "model.onnx", threads=1), cache, kind="fast")
    ref_tokens, ref = _greedy(cpu, PROMPT)
    tokens, logits = _greedy(OneTokenRunner(create_session(path, threads=1)), PROMPT)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_present_lands_at_its_row_and_a_rewind_forgets_the_rows_after(tiny_hf, tmp_path):
    """Each step writes its row into the runner's buffer at its position, nothing else; rows left
    behind by a rewind are masked, so feeding again answers as the first time; snapshots restore."""
    runner = OneTokenRunner(create_session(_export(tiny_hf("llama"), tmp_path, weights="fp32"), threads=1))
    cache = runner.cache
    assert isinstance(cache, FixedCache) and cache.capacity == CONTEXT
    first = runner.forward_all(PROMPT)
    rows = cache.keys[1][0, : len(PROMPT)].copy()
    assert np.abs(rows).max(axis=(1, 2)).all() and not cache.values[1][0, len(PROMPT):].any()
    snap = cache.snapshot(3)
    after = runner.forward([5, 6, 7])
    runner.rewind(len(PROMPT) - 2)  # rows 5..9 stay in the buffer, stale
    np.testing.assert_array_equal(runner.forward_all(PROMPT[-2:]), first[-2:])
    np.testing.assert_array_equal(runner.forward([5, 6, 7]), after)
    np.testing.assert_array_equal(cache.keys[1][0, : len(PROMPT)], rows)
    cache.restore(snap)
    runner.tokens[3:] = []
    assert runner.reuse(PROMPT) == 3 and runner.length == 3
    np.testing.assert_allclose(runner.forward_all(PROMPT[3:]), first[3:], atol=1e-6)


def test_the_context_is_the_graphs(tiny_hf, tmp_path):
    folder = tiny_hf("llama")
    path = _export(folder, tmp_path, context=8, weights="fp32")
    session = create_session(path, threads=1)
    runner = OneTokenRunner(session)
    runner.forward(PROMPT)
    with pytest.raises(GenerationError, match="holds 7 of 8 tokens.*--context.*cannot add 2"):
        runner.forward([1, 2])
    assert runner.length == 7  # refused before any step
    runner.forward([1])
    with pytest.raises(BundleError, match="context is 8 rows.*FixedCache of 16"):
        OneTokenRunner(session, FixedCache(2, 2, 16, 16))
    (tmp_path / "cpu").mkdir()
    build_fast_graph(open_hf_folder(folder), QuantConfig("fp32"), tmp_path / "cpu")
    with pytest.raises(BundleError, match="'attention_mask': not the one-token graph of --target qnn"):
        OneTokenRunner(create_session(tmp_path / "cpu" / "model.onnx", threads=1))
    with pytest.raises(ExportError, match="--context 600: expected 2 to the model's max_context 512"):
        build_qnn_graph(open_hf_folder(folder), QuantConfig("fp32", target="qnn", context=600), tmp_path)


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_qnn_graph_runs_whole_on_the_htp_with_the_cpu_tokens(weights, tiny_hf, tmp_path):
    """With CPU fallback disabled the session opens only if QNN's HTP takes every node; the
    simulator's fp16 arithmetic then picks the CPU provider's greedy tokens."""
    pytest.importorskip("onnxruntime_qnn", reason="the qnn extra is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import qnn_probe

    path = _export(tiny_hf("qwen3", tie_embeddings=False), tmp_path, weights=weights)
    session, placed = qnn_probe.qnn_session(path, fallback=False)
    assert (placed.qnn_nodes, placed.partitions, placed.left) == (placed.total_nodes, 1, [])
    # What onnxruntime hands QNN after its basic rewrites (constant folding): the graph, not a fragment.
    assert placed.total_nodes > 0.9 * len(onnx.load(path, load_external_data=False).graph.node)
    tokens, _ = _greedy(OneTokenRunner(session), PROMPT, 8)
    want, _ = _greedy(OneTokenRunner(create_session(path, threads=1)), PROMPT, 8)
    assert tokens == want
    assert len(set(want)) > 2  # a model stuck on one token would agree trivially


def test_export_qnn_bundle_loads_and_answers_as_the_cpu_bundle(tiny_hf, tmp_path, caplog):
    """The manifest records the target and its context, load() picks OneTokenRunner and that context,
    the quality gate ran the text a step a token, and greedy text is the cpu bundle's at level 0."""
    from edgellm.model import load
    from edgellm.export.api import export_model

    folder = tiny_hf("llama")
    # Random weights: whether int4 passes the gate is chance, so the bundle is written either way.
    manifest = export_model(folder, tmp_path / "qnn", quant=QuantConfig("int4", target="qnn", context=64),
                            allow_quality_loss=True)
    assert (manifest.graph.target, manifest.graph.context, manifest.quality["tokens"]) == ("qnn", 64, 64)
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        model = load(tmp_path / "qnn")
    assert isinstance(model._runner, OneTokenRunner) and model.max_context == 64
    assert any("--target qnn but runs on CPUExecutionProvider" in r.getMessage() for r in caplog.records)
    export_model(folder, tmp_path / "cpu", quant=QuantConfig("int4", accuracy_level=0), evaluate=False)
    want = load(tmp_path / "cpu").generate("The quick brown", max_new_tokens=10)
    assert model.generate("The quick brown", max_new_tokens=10).token_ids == want.token_ids
    manifest_path = tmp_path / "qnn" / "manifest.json"
    for bad in (None, 1, True, "64"):
        data = json.loads(manifest_path.read_text())
        data["graph"]["context"] = bad
        manifest_path.write_text(json.dumps(data))
        with pytest.raises(BundleError, match=f"graph.context must be an integer >= 2 for target qnn, got {bad!r}"):
            read_manifest(tmp_path / "qnn", verify=False)
    with pytest.raises(ExportError, match="^--context 64: only --target qnn fixes the context at export$"):
        QuantConfig("int4", context=64)
    with pytest.raises(ExportError, match="--kv-cache int8 --target qnn"):
        export_model(folder, tmp_path / "c", quant=QuantConfig("int4", target="qnn", kv_cache="int8"))

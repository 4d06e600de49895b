"""`--target openvino`: attention from standard ops and a sequence-major cache, checked on the CPU provider.

The graph is built for onnxruntime's OpenVINO provider, which CI does not have; the CPU
provider runs the same standard ops, so the graph's answers are checked here against
transformers, and the runtime's binding (past = the cached rows, present = the rows right
after them, in one buffer) against the cpu graph. Whether OpenVINO takes every node, and
what it answers, is checked by benchmarks/openvino.py where it is installed (devices/README.md).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgellm
from edgellm.runtime.bundle import Graph, read_manifest
from edgellm.errors import BundleError, ExportError, GenerationError
from edgellm.runtime.caches import AppendCache, SlotCache, StaticCache, cache_for
from edgellm.runtime.providers import create_session
from edgellm.runtime.runner import BatchRunner, Runner
from edgellm.export.api import export_model
from edgellm.export.config import QuantConfig
from edgellm.export.graph import build_fast_graph
from edgellm.export.gguf import open_gguf
from edgellm.export.hf import open_hf_folder
from gguf_writer import write_tiny_gguf
from test_gguf_exact import TIED_QTYPES, UNTIED_QTYPES
from test_graph import LLAMA3_ROPE, PROMPT, hf_greedy, hf_model
from tiny import PHI3_SHAPE

STEPS = 16
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
OPENVINO_PYTHON = os.environ.get("EDGELLM_OPENVINO_PYTHON")
CASES = {
    "llama-tied": ("llama", dict()),
    "llama-untied-llama3-rope": ("llama", dict(tie_embeddings=False, rope_scaling=LLAMA3_ROPE)),
    "qwen2-bias": ("qwen2", dict()),
    "qwen3-qk-norm": ("qwen3", dict(tie_embeddings=False)),
    "gemma3-window-scale": ("gemma3", dict(num_layers=4)),  # sliding window 4 < the prompt, its own scale
    "phi3-partial-rotary": ("phi3", PHI3_SHAPE),
}


def _export(folder: Path, out: Path, **quant) -> tuple[Path, object]:
    source = open_hf_folder(folder)
    out.mkdir(parents=True, exist_ok=True)
    build_fast_graph(source, QuantConfig(target="openvino", **quant), out)
    return out, source.spec


def _runner(graph_dir: Path, spec, target: str = "openvino") -> Runner:
    graph = Graph("fast", "model.onnx", (), (), target=target)
    cache = cache_for(graph, spec, 128)
    return Runner(create_session(graph_dir / "model.onnx", threads=1), cache, kind="fast")


def _greedy(runner: Runner, prompt: list[int], steps: int = STEPS) -> tuple[list[int], np.ndarray]:
    """Greedy tokens, the prompt fed in two chunks so the second attends across cached rows."""
    runner.forward(prompt[:3])
    rows = [runner.forward(prompt[3:])]
    tokens = [int(np.argmax(rows[-1]))]
    for _ in range(steps - 1):
        rows.append(runner.forward([tokens[-1]]))
        tokens.append(int(np.argmax(rows[-1])))
    return tokens, np.stack(rows)


@pytest.mark.parametrize("case", CASES)
def test_openvino_graph_matches_transformers(case, tiny_hf, tmp_path):
    arch, kw = CASES[case]
    folder = tiny_hf(arch, **kw)
    graph_dir, spec = _export(folder, tmp_path, weights="fp32")
    ref_tokens, ref_logits = hf_greedy(hf_model(folder), PROMPT, STEPS)
    tokens, logits = _greedy(_runner(graph_dir, spec), PROMPT)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)


def test_openvino_graph_has_no_attention_or_gather_contrib_ops(tiny_hf, tmp_path):
    """OpenVINO takes MatMulNBits and the RMS norms; GroupQueryAttention (and GatherBlockQuantized,
    which no graph uses any more) is what splits the cpu graph, so none may remain."""
    graph_dir, spec = _export(tiny_hf("llama"), tmp_path, weights="int4")
    graph = onnx.load(graph_dir / "model.onnx", load_external_data=False).graph
    contrib = collections.Counter(n.op_type for n in graph.node if n.domain == "com.microsoft")
    assert set(contrib) == {"MatMulNBits", "SkipSimplifiedLayerNormalization"}, contrib
    assert sum(n.op_type == "Softmax" for n in graph.node) == spec.num_layers
    past = next(v for v in graph.input if v.name == "past_key_values.0.key")
    present = next(v for v in graph.output if v.name == "present.0.key")
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (past, present)]
    assert dims == [["batch", "past_sequence_length", spec.num_kv_heads, spec.head_dim],
                    ["batch", "sequence_length", spec.num_kv_heads, spec.head_dim]]


@pytest.mark.parametrize("quant", [dict(weights="int4"), dict(weights="int4", symmetric=False),
                                   dict(weights="int8")], ids=["int4", "int4-asym", "int8"])
def test_openvino_quantized_graph_equals_the_cpu_graph(quant, tiny_hf, tmp_path):
    """Float activations (the openvino default, accuracy_level 0), and an embedding that unpacks
    its own int4 rows (nibbles, zero points, scales): the cpu graph's answers on the same weights
    (its gathered embedding is exact against the dequantized weights in test_graph)."""
    folder = tiny_hf("qwen2", tie_embeddings=False)
    (ref_tokens, ref), (tokens, logits) = _both(folder, tmp_path, dict(accuracy_level=0, block_size=32, **quant), 8)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_append_cache_writes_new_rows_in_place_and_rewinds(tiny_hf, tmp_path):
    """present lands in the rows after past, inside the runner's own buffers; a rewound
    cache and a restored snapshot answer as a fresh one."""
    graph_dir, spec = _export(tiny_hf("llama"), tmp_path, weights="fp32")
    runner = _runner(graph_dir, spec)
    cache = runner.cache
    assert isinstance(cache, AppendCache)
    first = runner.forward(PROMPT)
    rows = cache.keys[0][0, : len(PROMPT)].copy()
    assert np.abs(rows).max(axis=(1, 2)).all()  # every prompt row written
    assert not cache.keys[0][0, len(PROMPT):].any()  # nothing past them
    snap = cache.snapshot(4)
    after = runner.forward([5, 6])
    runner.rewind(len(PROMPT))
    np.testing.assert_array_equal(runner.forward([5, 6]), after)
    np.testing.assert_array_equal(cache.keys[0][0, : len(PROMPT)], rows)
    cache.restore(snap)
    runner.tokens[4:] = []
    np.testing.assert_allclose(runner.forward(PROMPT[4:]), first, atol=1e-5)


def test_openvino_runner_refuses_the_wrong_cache_and_cache_slots(tiny_hf, tmp_path):
    graph_dir, spec = _export(tiny_hf("llama"), tmp_path, weights="fp32")
    session = create_session(graph_dir / "model.onnx", threads=1)
    with pytest.raises(BundleError, match="sequence-major.*StaticCache"):
        Runner(session, StaticCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, 64), kind="fast")
    with pytest.raises(BundleError, match="one request at a time"):
        BatchRunner(session, SlotCache(2, spec.num_layers, spec.num_kv_heads, spec.head_dim, 64))


def _both(folder: Path, tmp_path: Path, quant: dict, steps: int) -> tuple[tuple, tuple]:
    """(greedy tokens, their logits) of the cpu graph and of the openvino graph of the same weights."""
    cpu_dir = tmp_path / "cpu"
    cpu_dir.mkdir()
    build_fast_graph(open_hf_folder(folder), QuantConfig(**quant), cpu_dir)
    graph_dir, spec = _export(folder, tmp_path / "openvino", **quant)
    return _greedy(_runner(cpu_dir, spec, "cpu"), PROMPT, steps), _greedy(_runner(graph_dir, spec), PROMPT, steps)


def test_export_openvino_bundle(tiny_hf, tmp_path):
    manifest = export_model(tiny_hf("llama"), tmp_path / "b", quant=QuantConfig("int4", target="openvino"))
    graph = read_manifest(tmp_path / "b").graph
    assert graph.target == "openvino" and graph.kv_dtype == "float32" and graph.batch is False
    assert manifest.quality["perplexity"] / manifest.quality["source_perplexity"] < 1.05
    with pytest.raises(ExportError, match="int8 --target openvino"):
        export_model(tiny_hf("llama"), tmp_path / "c", quant=QuantConfig("int4", target="openvino", kv_cache="int8"))


def test_an_openvino_bundle_loads_warns_off_openvino_and_serves_one_at_a_time(tiny_hf, tmp_path, caplog):
    export_model(tiny_hf("llama"), tmp_path / "b", quant=QuantConfig("fp32", target="openvino"), evaluate=False)
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        model = edgellm.load(tmp_path / "b")
    assert any("--target openvino but runs on CPUExecutionProvider" in r.getMessage() for r in caplog.records)
    prompts = ["The quick brown fox", "Edge boards"]
    alone = [model.generate(p, max_new_tokens=6, ignore_eos=True, temperature=0) for p in prompts]
    together = model.generate_many(prompts, slots=2, max_new_tokens=6, ignore_eos=True, temperature=0)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    with pytest.raises(GenerationError, match="--target openvino graph decodes one request at a time"):
        model.scheduler(2)


# Which fused linear of layer 0 holds Q4_1 blocks at 4 bits (TIED_QTYPES widens its QKV to Q8_0's 8).
@pytest.mark.parametrize("arch,qtypes,model_kw,float_zeros", [
    ("llama", TIED_QTYPES, {}, "mlp.gate_up_proj"),
    ("qwen2", UNTIED_QTYPES, {"tie_embeddings": False}, "self_attn.qkv_proj"),
])
def test_openvino_gguf_q4_1_is_exact(arch, qtypes, model_kw, float_zeros, tiny_hf, tmp_path):
    """GGUF Q4_0/Q4_1/Q8_0 blocks as they are: 4-bit Q4_1's offsets become float zero points of
    the MatMulNBits (OpenVINO decompresses them in its int4 matmul; 8-bit rows keep the offsets'
    MatMul) and shifts of the embedding's rows; the graph equals the fp32 graph of gguf-py's
    dequantized weights."""
    path = write_tiny_gguf(tiny_hf(arch, **model_kw), tmp_path / "m.gguf", qtypes)
    source = open_gguf(path)
    dirs = tmp_path / "openvino", tmp_path / "fp32"
    for d, quant in zip(dirs, (QuantConfig(target="openvino"), QuantConfig("fp32"))):
        d.mkdir()
        build_fast_graph(source, quant, d)
    graph = onnx.load(dirs[0] / "model.onnx", load_external_data=False).graph
    zeros = {i.name: i.data_type for i in graph.initializer if i.name.endswith(".qzeros")}
    assert zeros[f"model.layers.0.{float_zeros}.qzeros"] == onnx.TensorProto.FLOAT
    offsets = {n.name for n in graph.node if n.name.endswith("/offsets/MatMul")}
    assert f"/model/layers.0/{float_zeros.replace('self_attn', 'attn').replace('.', '/')}/offsets/MatMul" not in offsets
    assert offsets <= {f"/model/layers.{i}/attn/qkv_proj/offsets/MatMul" for i in range(source.spec.num_layers)}
    ref_tokens, ref = _greedy(_runner(dirs[1], source.spec, "cpu"), PROMPT, 8)
    tokens, logits = _greedy(_runner(dirs[0], source.spec), PROMPT, 8)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.skipif(not OPENVINO_PYTHON, reason="EDGELLM_OPENVINO_PYTHON names no Python with onnxruntime-openvino "
                    "(it replaces the onnxruntime wheel, so it lives in a venv of its own)")
def test_tiny_bundle_runs_whole_inside_openvino(tiny_hf, tmp_path):
    """Where OpenVINO is installed: every node on it (CPU fallback disabled), the CPU provider's greedy tokens."""
    bundle = tmp_path / "b"
    export_model(tiny_hf("llama"), bundle, quant=QuantConfig("int4", target="openvino"), evaluate=False)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(PROMPT * 3))
    rows = {}
    for python, provider in ((sys.executable, "CPUExecutionProvider"), (OPENVINO_PYTHON, "OpenVINOExecutionProvider")):
        cmd = [python, str(BENCH / "openvino.py"), "worker", "--bundle", str(bundle), "--provider", provider,
               "--ids", str(ids), "--tokens", "24"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(BENCH.parent)})
        assert done.returncode == 0, done.stderr[-2000:]
        rows[provider] = json.loads(done.stdout.strip().splitlines()[-1])
    ov = rows["OpenVINOExecutionProvider"]
    assert ov["every_node"] is True and ov["providers"][0] == "OpenVINOExecutionProvider"
    assert ov["tokens"] == rows["CPUExecutionProvider"]["tokens"]

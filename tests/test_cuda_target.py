"""`--target cuda`: the fast graph with float16 activations, validated on the CPU provider.

onnxruntime's CPU provider has float16 kernels for GroupQueryAttention, MatMulNBits
and both RMS norms, and runs the elementwise ops (Sigmoid, Mul,
Add, Gelu, a float MatMul) between inserted float32 casts, which rounds each result
to float16 as a GPU would. So the float16 graph's answers can be checked here against
the float32 graph of the same weights; whether a GPU runs it is recorded in devices/README.md.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

import edgellm
from edgellm.runtime.bundle import read_manifest
from edgellm.errors import ExportError
from edgellm.runtime.caches import StaticCache
from edgellm.runtime.providers import create_session
from edgellm.runtime.runner import Runner
from edgellm.export.api import export_model
from edgellm.export.cli import add_arguments, run
from edgellm.export.config import QuantConfig
from edgellm.export.graph import build_fast_graph
from edgellm.export.hf import open_hf_folder
from test_graph import TRAIN_TEXT, trained_tiny  # noqa: F401 - the fixture is used by name
from tiny import PHI3_SHAPE, build_tokenizer

STEPS = 32
# Ops with a float16 CPU kernel: they must take float16 as they are, never between inserted casts.
FP16_KERNELS = {"GroupQueryAttention", "MatMulNBits", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}


def _runner(graph_dir: Path, spec, kv_dtype: str) -> Runner:
    cache = StaticCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, 128, kv_dtype)
    return Runner(create_session(graph_dir / "model.onnx", threads=1), cache, kind="fast")


def _greedy(runner: Runner, prompt: list[int], steps: int = STEPS) -> tuple[list[int], np.ndarray]:
    """Free-running greedy tokens and the logits each was chosen from."""
    rows = [runner.forward(prompt)]
    tokens = [int(np.argmax(rows[-1]))]
    for _ in range(steps - 1):
        rows.append(runner.forward([tokens[-1]]))
        tokens.append(int(np.argmax(rows[-1])))
    return tokens, np.stack(rows)


def _forced(runner: Runner, prompt: list[int], continuation: list[int]) -> np.ndarray:
    rows = [runner.forward(prompt)]
    rows += [runner.forward([t]) for t in continuation[:-1]]
    return np.stack(rows)


def _pair(source, tmp: Path, weights: str) -> tuple[Path, Path]:
    """The cpu graph (float activations, float32 KV) and the cuda graph of the same weights."""
    ref = QuantConfig("fp32") if weights == "fp16" else QuantConfig(weights, accuracy_level=0)
    cuda = QuantConfig(weights, target="cuda")
    dirs = tmp / f"{weights}-cpu", tmp / f"{weights}-cuda"
    for d, q in zip(dirs, (ref, cuda)):
        d.mkdir()
        build_fast_graph(source, q, d)
    return dirs


def test_cuda_graph_is_float16_end_to_end(tiny_hf, tmp_path):
    source = open_hf_folder(tiny_hf("llama"))
    cpu, cuda = _pair(source, tmp_path, "int4")
    graph = onnx.load(cuda / "model.onnx", load_external_data=False).graph
    kv = [v for v in [*graph.input, *graph.output] if v.name.startswith(("past_key_values.", "present."))]
    assert len(kv) == 4 * source.spec.num_layers
    assert {v.type.tensor_type.elem_type for v in kv} == {TensorProto.FLOAT16}
    logits = next(v for v in graph.output if v.name == "logits")
    assert logits.type.tensor_type.elem_type == TensorProto.FLOAT  # cast once, for the sampler
    floats = {t.name: t.data_type for t in graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    assert floats and set(floats.values()) == {TensorProto.FLOAT16}, floats
    # The same nodes as the cpu graph, plus the logits cast.
    cpu_ops = collections.Counter(n.op_type for n in onnx.load(cpu / "model.onnx", load_external_data=False).graph.node)
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops - cpu_ops == collections.Counter({"Cast": 1}) and not cpu_ops - ops

    # What the CPU provider makes of it: the contrib ops run their own float16 kernels.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(cuda / "model.onnx"), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(tmp_path / "optimized.onnx", load_external_data=False).graph.node
    widened = {n.output[0] for n in nodes if n.name.startswith("InsertedPrecisionFreeCast")
               and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)}
    between_casts = {n.op_type for n in nodes if set(n.input) & widened}
    assert between_casts and not between_casts & FP16_KERNELS, between_casts


def test_cuda_greedy_agrees_with_fp32(trained_tiny, tmp_path):  # noqa: F811 - the imported fixture
    """A confident model's free-running greedy tokens on several prompts, float16 against float32."""
    source = open_hf_folder(trained_tiny)
    ids = build_tokenizer().encode(TRAIN_TEXT).ids
    prompts = [ids[:4], ids[:8], ids[10:17], ids[25:40], ids[3:6]]
    for weights in ("fp16", "int4"):
        cpu, cuda = _pair(source, tmp_path, weights)
        agree, errors = [], []
        for prompt in prompts:
            ref, ref_logits = _greedy(_runner(cpu, source.spec, "float32"), prompt)
            tokens, _ = _greedy(_runner(cuda, source.spec, "float16"), prompt)
            agree.append(np.mean(np.array(tokens) == ref))
            forced = _forced(_runner(cuda, source.spec, "float16"), prompt, ref)
            errors.append(np.abs(forced - ref_logits).max() / np.abs(ref_logits).max())
        assert np.mean(agree) >= 0.9 and min(agree) >= 0.75, f"{weights}: greedy agreement {agree}"
        assert max(errors) < 1e-2, f"{weights}: logits {max(errors):.1e} of their scale apart"


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "phi3"])
def test_cuda_logits_stay_close_across_families(arch, tiny_hf, tmp_path):
    """Each family's blocks in float16 (q/k norms, sandwich norms, GELU, partial rotary,
    sliding windows, biases), teacher-forced along the float32 graph's greedy tokens."""
    kw = {"gemma3": dict(num_layers=4), "phi3": PHI3_SHAPE}.get(arch, {})
    source = open_hf_folder(tiny_hf(arch, **kw))
    cpu, cuda = _pair(source, tmp_path, "fp16")
    prompt = [5, 17, 33, 100, 7, 250, 3, 9, 41, 12]
    ref, ref_logits = _greedy(_runner(cpu, source.spec, "float32"), prompt)
    forced = _forced(_runner(cuda, source.spec, "float16"), prompt, ref)
    error = np.abs(forced - ref_logits).max() / np.abs(ref_logits).max()
    agree = np.mean(forced.argmax(-1) == np.array(ref))
    assert error < 1.5e-2 and agree >= 0.9, f"{arch}: logits {error:.1e} of scale apart, argmax agrees {agree:.0%}"


def test_cuda_bundle_exports_gates_and_loads(trained_tiny, tmp_path, capsys):  # noqa: F811
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "bundle"
    assert run(parser.parse_args([str(trained_tiny), "-o", str(out), "--target", "cuda"])) == 0
    assert "kv float16, target cuda" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest.graph.target == "cuda" and manifest.graph.kv_dtype == "float16"
    assert manifest.quantization["kv_cache"] == "float16" and "target" not in manifest.quantization
    assert manifest.quantization["accuracy_level"] == 0  # what CUDA's kernel computes, so the gate measures it
    q = manifest.quality  # float16 int4 against the float32 graph of the source's weights
    assert q["passed"] and q["perplexity"] != q["source_perplexity"]
    ids = build_tokenizer().encode(TRAIN_TEXT).ids
    model = edgellm.load(out)
    reply = model.generate(build_tokenizer().decode(ids[:8]), max_new_tokens=8, ignore_eos=True)
    assert reply.text

    cpu = tmp_path / "cpu"
    export_model(trained_tiny, cpu, evaluate=False)
    assert "target" not in json.loads((cpu / "manifest.json").read_text())["graph"]  # cpu is written as before
    assert read_manifest(cpu).graph.target == "cpu"


def test_cuda_bundle_decodes_slots_together(tiny_hf, tmp_path, caplog):
    """Right-padded rows through float16 GroupQueryAttention and the runtime's float16 slot cache."""
    out = tmp_path / "bundle"
    export_model(tiny_hf("qwen2"), out, quant=QuantConfig("int8", target="cuda"), evaluate=False)
    model = edgellm.load(out)
    assert "exported with --target cuda but runs on CPUExecutionProvider" in caplog.text
    prompts = ["The quick brown fox", "Edge boards run small models", "What is"]
    alone = [model.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    together = model.generate_many(prompts, slots=3, max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in together] == alone


@pytest.mark.parametrize("quant, via, message", [
    (dict(weights="fp32", target="cuda"), "fast", "--quant fp32 --target cuda"),
    (dict(weights="int4", target="cuda", kv_cache="int8"), "fast", "--kv-cache int8 --target cuda"),
    (dict(weights="int4", kv_cache="float16"), "fast", "--kv-cache float16: needs --target cuda"),
    (dict(weights="int4", target="cuda"), "optimum", "--target cuda: the optimum path"),
    (dict(weights="int4", target="tpu"), "fast", "--target 'tpu'"),
    (dict(weights="int4", target="cuda", accuracy_level=4), "fast", "--accuracy-level 4 --target cuda"),
])
def test_cuda_refusals_name_the_option(quant, via, message, tiny_hf, tmp_path):
    with pytest.raises(ExportError, match=message.replace("-", r"\-")):
        export_model(tiny_hf("llama"), tmp_path / "b", quant=QuantConfig(**quant), via=via, evaluate=False)

"""The generic export path (`--via optimum`) against transformers on tiny random models.

Exports are shared per module: each tiny model is exported once per weight type.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgellm.errors import ExportError
from edgellm.export.config import QuantConfig
from edgellm.export.optimum_path import export_optimum, op_histogram, untie_transposed_weights, write_graph
from tests.tiny import make_tiny_model

pytest.importorskip("optimum.exporters.onnx")
torch = pytest.importorskip("torch")

PROMPT = "The quick brown fox"
DECODE_STEPS = 16
TEACHER_POSITIONS = 32
# Logits of these tiny models reach ~±10; fp32 export and torch differ by float rounding only.
FP32_ATOL = 1e-4
MIN_AGREEMENT = 0.9


class OrtGreedy:
    """A minimal greedy loop over a generic graph: the KV cache grows by concatenation."""

    def __init__(self, path: Path) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(
        self, prompt: list[int], steps: int, forced: list[int] | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """Logits after the prompt and after each of `steps` decoded tokens, and the tokens fed.

        With `forced`, token i fed back is forced[i] (teacher forcing) instead of the argmax.
        """
        past = {}
        for name in self.kv_names:
            _, heads, _, dim = self.inputs[name].shape
            past[name] = np.zeros((1, heads, 0, dim), dtype=np.float32)
        ids, length, rows, tokens = list(prompt), 0, [], []
        for step in range(steps + 1):
            feeds = {
                "input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, length + len(ids)), dtype=np.int64),
                **past,
            }
            if "position_ids" in self.inputs:
                feeds["position_ids"] = np.arange(length, length + len(ids), dtype=np.int64)[None]
            out = dict(zip(self.outputs, self.session.run(None, feeds)))
            rows.append(out["logits"][0, -1])
            length += len(ids)
            past = {name: out[name.replace("past_key_values", "present")] for name in self.kv_names}
            token = forced[step] if forced is not None else int(rows[-1].argmax())
            tokens.append(token)
            ids = [token]
        return np.stack(rows), tokens[:steps]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("optimum")


def snap_to_int4(src: Path, dst: Path, block_size: int = 32) -> Path:
    """Copy a tiny model with every weight matrix made exactly representable in symmetric int4.

    Random Gaussian weights in a tiny model leave greedy margins (~0.3) far below int4's
    rounding noise (logits move by up to ~3), so agreement would measure the noise, not the
    export. On an int4 grid the quantizer is lossless and any disagreement is a wiring fault.
    """
    from safetensors.numpy import load_file, save_file

    from edgellm.export.quantize import dequantize, quantize_nbits

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    for name, w in weights.items():
        if w.ndim == 2:
            weights[name] = dequantize(quantize_nbits(w, 4, block_size, True))
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def source(workdir: Path):
    """source(arch, tied, int4_exact) -> a tiny HF folder, built once."""
    cache: dict[tuple[str, bool, bool], Path] = {}

    def get(arch: str, tied: bool = True, int4_exact: bool = False) -> Path:
        key = (arch, tied, int4_exact)
        if key not in cache:
            if int4_exact:
                cache[key] = snap_to_int4(get(arch, tied), workdir / f"src-{arch}-{tied}-int4")
            else:
                cache[key] = make_tiny_model(workdir / f"src-{arch}-{tied}", arch, tie_embeddings=tied)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def bundle(workdir: Path, source):
    """bundle(arch, weights, tied) -> (out_dir, GraphInfo), exported once; int4 from int4-exact weights."""
    cache: dict[tuple[str, str, bool], tuple[Path, object]] = {}

    def get(arch: str, weights: str = "fp32", tied: bool = True):
        key = (arch, weights, tied)
        if key not in cache:
            out = workdir / f"out-{arch}-{weights}-{tied}"
            src = source(arch, tied, int4_exact=weights == "int4")
            cache[key] = (out, export_optimum(src, out, QuantConfig(weights=weights)))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(source):
    """reference(arch, tied, int4_exact) -> (prompt ids, transformers' greedy tokens, logits at each)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    cache: dict[tuple[str, bool, bool], tuple[list[int], list[int], np.ndarray]] = {}

    def get(arch: str, tied: bool = True, int4_exact: bool = False):
        key = (arch, tied, int4_exact)
        if key not in cache:
            src = source(*key)
            prompt = Tokenizer.from_file(str(src / "tokenizer.json")).encode(PROMPT).ids
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(TEACHER_POSITIONS):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
                logits = model(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1].numpy()
            cache[key] = (prompt, ids[len(prompt) :], logits)
        return cache[key]

    return get


def _producer(model: onnx.ModelProto, output: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if output in n.output)


def _teacher_forced_agreement(path: Path, prompt: list[int], tokens: list[int]) -> float:
    logits, _ = OrtGreedy(path).run(prompt, len(tokens) - 1, forced=tokens)
    return float(np.mean(logits.argmax(-1) == np.array(tokens)))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fp32_matches_transformers(arch: str, bundle, reference) -> None:
    out, info = bundle(arch)
    prompt, ref_tokens, ref_logits = reference(arch)
    logits, tokens = OrtGreedy(out / info.file).run(prompt, DECODE_STEPS)
    assert tokens == ref_tokens[:DECODE_STEPS]
    np.testing.assert_allclose(logits, ref_logits[: DECODE_STEPS + 1], rtol=0, atol=FP32_ATOL)
    assert info.notes and "optimum" in info.notes[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_int4_greedy_agrees(arch: str, bundle, reference) -> None:
    out, info = bundle(arch, "int4")
    prompt, ref_tokens, _ = reference(arch, int4_exact=True)
    assert _teacher_forced_agreement(out / info.file, prompt, ref_tokens) >= MIN_AGREEMENT


@pytest.mark.parametrize("weights", ["int8", "fp16"])
def test_int8_and_fp16_greedy_agree(weights: str, bundle, reference) -> None:
    out, info = bundle("llama", weights)
    prompt, ref_tokens, _ = reference("llama")
    assert _teacher_forced_agreement(out / info.file, prompt, ref_tokens) >= MIN_AGREEMENT
    model = onnx.load(out / info.file, load_external_data=False)
    if weights == "int8":
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert nbits and all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in nbits)
    else:
        matrices = [t for t in model.graph.initializer if len(t.dims) == 2]
        assert matrices and all(t.data_type == onnx.TensorProto.FLOAT16 for t in matrices)


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_is_quantized(tied: bool, bundle) -> None:
    out, info = bundle("llama", "int4", tied)
    model = onnx.load(out / info.file, load_external_data=False)
    head = _producer(model, "logits")
    assert head.op_type == "MatMulNBits"
    assert {a.name: a.i for a in head.attribute}["bits"] == 4
    # q, k, v, o, gate, up, down per layer, and the head; no MatMul keeps a constant weight.
    assert op_histogram(model)["MatMulNBits"] == 2 * 7 + 1
    weights = {t.name for t in model.graph.initializer}
    assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def test_transposed_tied_head_is_untied_and_quantized(source, reference, tmp_path: Path) -> None:
    """With accelerate installed, optimum ties lm_head as MatMul(x, Transpose(embedding))."""
    from optimum.onnx import remove_duplicate_weights_from_tied_info
    from transformers import AutoModelForCausalLM

    src = source("llama", int4_exact=True)
    info = export_optimum(src, tmp_path / "fp32", QuantConfig(weights="fp32"))
    model = onnx.load(tmp_path / "fp32" / info.file)
    torch_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tied = [["lm_head.weight", "model.embed_tokens.weight"]]
    model = remove_duplicate_weights_from_tied_info(model, torch_model, tied, str(tmp_path / "tied.onnx"))
    assert _producer(model, _producer(model, "logits").input[1]).op_type == "Transpose"

    result = write_graph(model, tmp_path / "bundle", QuantConfig(weights="int4"))
    written = onnx.load(tmp_path / "bundle" / result.file, load_external_data=False)
    assert _producer(written, "logits").op_type == "MatMulNBits"
    assert any("transposed" in note for note in result.notes)
    prompt, ref_tokens, _ = reference("llama", int4_exact=True)
    assert _teacher_forced_agreement(tmp_path / "bundle" / result.file, prompt, ref_tokens) >= MIN_AGREEMENT


def test_untie_transposed_weights_keeps_values() -> None:
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
            onnx.helper.make_node("MatMul", ["x", "emb_t"], ["logits"], name="head"),
            onnx.helper.make_node("Gather", ["emb", "ids"], ["h"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3]),
         onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 4]),
         onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.numpy_helper.from_array(emb, "emb")],
    )
    assert untie_transposed_weights(graph) == ["head"]
    assert [n.op_type for n in graph.node] == ["MatMul", "Gather"]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    np.testing.assert_array_equal(weights[graph.node[0].input[1]], emb.T)
    np.testing.assert_array_equal(weights["emb"], emb)


def test_graph_info_names_the_written_graph(bundle) -> None:
    out, info = bundle("qwen2", "int4")
    model = onnx.load(out / info.file, load_external_data=False)
    assert (info.kind, info.file, info.kv_dtype) == ("generic", "model.onnx", "float32")
    assert info.inputs == [i.name for i in model.graph.input]
    assert info.outputs == [o.name for o in model.graph.output]
    kv = [f"{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert info.inputs[:2] == ["input_ids", "attention_mask"]
    expected = {"input_ids", "attention_mask", *(f"past_key_values.{n}" for n in kv)}
    assert set(info.inputs) - {"position_ids"} == expected
    assert info.outputs == ["logits", *(f"present.{n}" for n in kv)]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "frobnicator"}')
    with pytest.raises(ExportError, match="architecture 'frobnicator' is not supported"):
        export_optimum(tmp_path, tmp_path / "out", QuantConfig())


def test_encoder_only_architecture_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ExportError, match="cannot export 'bert' as a decoder"):
        export_optimum(tmp_path, tmp_path / "out", QuantConfig())


def test_missing_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="config.json: missing"):
        export_optimum(tmp_path, tmp_path / "out", QuantConfig())


def test_missing_optimum_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)  # makes the import fail
    with pytest.raises(ExportError, match=r"pip install edgellm\[optimum\]"):
        export_optimum(tmp_path, tmp_path / "out", QuantConfig())

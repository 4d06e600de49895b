"""The fast graph against transformers, and the HF source and quantizer beneath it.

Random tiny models check the graph's arithmetic (fp32 exact, int4 exact against the
same weights fake-quantized in torch); a tiny model trained for a second checks
that int4 keeps greedy answers, since a random network's argmax is noise-sensitive.
"""
from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from safetensors.numpy import load_file, save_file

from edgellm.errors import ExportError
from edgellm.runtime.model_spec import ModelSpec
from edgellm.export.api import export_model
from edgellm.export.config import QuantConfig
from edgellm.export.graph import build_fast_graph, gather_rows
from edgellm.export.hf import open_hf_folder
from edgellm.export.linear import Writer, apply_linear, quantized_linear
from edgellm.export.quantize import dequantize, quantize_nbits
from ort_loop import FastGraphRunner
from tiny import _CORPUS, build_tokenizer

PROMPT = [5, 17, 33, 100, 7, 250, 3]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def export(src_dir: Path, out: Path, **quant) -> tuple[Path, object]:
    source = open_hf_folder(src_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_fast_graph(source, QuantConfig(**quant), out)
    return out / "model.onnx", source.spec


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens and, teacher-forced along them, the logits that chose each."""
    with torch.no_grad():
        seq = model.generate(
            torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False
        )[0].tolist()
        logits = model(torch.tensor([seq])).logits[0].numpy()
    return seq[len(prompt):], logits[len(prompt) - 1 : -1]


# --- HF source ---------------------------------------------------------------


def test_hf_source_reads_spec_tokenizer_and_generation(tiny_hf):
    folder = tiny_hf("llama", rope_scaling=LLAMA3_ROPE)
    src = open_hf_folder(folder)
    spec = src.spec
    assert (spec.arch, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == ("llama", 2, 64, 4, 2)
    assert spec.head_dim == 16 and spec.max_context == 512 and spec.tie_embeddings
    assert spec.rope_scaling["rope_type"] == "llama3" and spec.rope_scaling["factor"] == 8.0
    assert not spec.attention_bias and not spec.qk_norm
    gen = src.generation
    assert gen["bos_token_id"] == 1 and gen["eos_token_ids"] == [2] and gen["pad_token_id"] == 0
    assert gen["eos_token"] == "<|im_end|>" and gen["bos_token"] == "<|im_start|>"
    assert "<|im_start|>" in src.chat_template
    assert json.loads(src.tokenizer_json)["model"]["type"] == "BPE"
    desc = src.describe()
    assert desc["kind"] == "hf" and desc["files"] == ["model.safetensors"] and len(desc["sha256"]) == 64
    state = hf_model(folder).state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(src.tensor(name), state[name].numpy())
    with pytest.raises(ExportError, match="missing"):
        src.tensor("model.layers.9.mlp.down_proj.weight")


def test_hf_source_arch_flags(tiny_hf):
    assert open_hf_folder(tiny_hf("qwen2")).spec.attention_bias
    assert open_hf_folder(tiny_hf("qwen3")).spec.qk_norm
    assert not open_hf_folder(tiny_hf("mistral", tie_embeddings=False)).spec.tie_embeddings


def test_bf16_checkpoint_widens_exactly(tiny_hf):
    folder = tiny_hf("llama", dtype="bfloat16")
    from safetensors.torch import load_file as load_torch

    src = open_hf_folder(folder)
    state = load_torch(folder / "model.safetensors")
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        np.testing.assert_array_equal(src.tensor(name), state[name].float().numpy())


def test_sharded_checkpoint_reads_like_single(tiny_hf, tmp_path):
    single = tiny_hf("qwen2")
    sharded = tmp_path / "sharded"
    shutil.copytree(single, sharded)
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, sharded / file)
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    src = open_hf_folder(sharded)
    assert sorted(src.names()) == names and src.describe()["files"] == sorted(shards)
    for name in names:
        np.testing.assert_array_equal(src.tensor(name), tensors[name])


def test_hf_source_errors_name_the_culprit(tiny_hf, tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(tiny_hf("llama"), tmp_path / name))

    truncated = copy("truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ExportError, match="model.safetensors: truncated"):
        open_hf_folder(truncated)

    garbage = copy("garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ExportError, match="model.safetensors: corrupt"):
        open_hf_folder(garbage)

    gpt2 = copy("gpt2")
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert open_hf_folder(gpt2).spec.arch == "gpt2"  # shapes only: the path is chosen after reading
    with pytest.raises(ExportError, match="'gpt2' has no fast graph.*try --via optimum"):
        export_model(gpt2, tmp_path / "gpt2-bundle", via="fast", evaluate=False)

    yarn = copy("yarn")
    (yarn / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ExportError, match="rope_scaling type 'yarn'"):
        open_hf_folder(yarn)

    no_tok = copy("no_tok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="tokenizer.json: missing"):
        open_hf_folder(no_tok)


# --- quantizer ---------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric,k", [(4, True, 64), (4, False, 80), (8, True, 80), (8, False, 64)])
def test_quantized_layout_is_what_the_kernels_read(bits, symmetric, k, tmp_path):
    """dequantize() agrees with MatMulNBits and with the embedding's gather of the same
    initializers (codes, scales, zero points: one copy, read by both)."""
    rng = np.random.default_rng(bits + k)
    n, block = 48, 32
    w = rng.normal(size=(n, k)).astype(np.float32)
    q = quantize_nbits(w, bits, block, symmetric)
    dq = dequantize(q)
    step = np.abs(w).max() / (2 ** (bits - 1) - 1)
    assert dq.shape == (n, k) and np.abs(dq - w).max() <= step and (q.zero_points is None) == symmetric
    writer, quant = Writer(tmp_path / "w.data"), QuantConfig(accuracy_level=0)
    lin = quantized_linear(writer, "w", q, None, quant)
    apply_linear(writer, "/w", "x", lin, quant, out="y")
    spec = ModelSpec("llama", 1, hidden_size=k, intermediate_size=k, num_heads=1, num_kv_heads=1, head_dim=k,
                     vocab_size=n, max_context=8)
    writer.nodes.append(helper.make_node("Identity", [gather_rows(writer, "/e", spec, q, lin)], ["e"]))
    writer.close()
    graph = helper.make_graph(
        writer.nodes, "q",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, k]),
         helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)],
        writer.initializers,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    onnx.save_model(helper.make_model(graph, opset_imports=opsets, ir_version=10), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(2, k)).astype(np.float32)
    ids = np.array([[0, 47, 5]])
    y, e = session.run(None, {"x": x, "input_ids": ids})
    np.testing.assert_allclose(y, x @ dq.T, atol=1e-4)
    np.testing.assert_array_equal(e[0], dq[ids[0]])


# --- the graph ---------------------------------------------------------------

FP32_CASES = {
    "llama-tied": ("llama", dict()),
    "llama-untied-llama3-rope": ("llama", dict(tie_embeddings=False, rope_scaling=LLAMA3_ROPE)),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2-bias": ("qwen2", dict()),
    "qwen3-qk-norm": ("qwen3", dict(tie_embeddings=False)),
    "mistral": ("mistral", dict(tie_embeddings=False)),
}


@pytest.mark.parametrize("case", FP32_CASES)
def test_fp32_graph_matches_transformers(case, tiny_hf, tmp_path):
    arch, kw = FP32_CASES[case]
    folder = tiny_hf(arch, **kw)
    model, spec = export(folder, tmp_path, weights="fp32")
    ref_tokens, ref_logits = hf_greedy(hf_model(folder), PROMPT, 16)
    tokens, logits = FastGraphRunner(model, spec).greedy(PROMPT, 16)
    assert tokens == ref_tokens
    # float32 reassociation only: 1e-4 of the logit scale.
    np.testing.assert_allclose(np.stack(logits), ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)


def test_sliding_window_matches_transformers(tiny_hf, tmp_path):
    folder = Path(shutil.copytree(tiny_hf("mistral", tie_embeddings=False), tmp_path / "sw"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 4}))
    model, spec = export(folder, tmp_path / "out", weights="fp32")
    assert spec.sliding_window == 4
    ref_tokens, ref_logits = hf_greedy(hf_model(folder), PROMPT, 8)
    tokens, logits = FastGraphRunner(model, spec).greedy(PROMPT, 8)
    assert tokens == ref_tokens
    np.testing.assert_allclose(np.stack(logits), ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)


QUANT_CASES = {
    "llama-int4-tied": ("llama", dict(), dict(weights="int4")),
    "qwen2-int4-untied-asym": ("qwen2", dict(tie_embeddings=False), dict(weights="int4", symmetric=False)),
    "qwen3-int8-tied": ("qwen3", dict(), dict(weights="int8")),
}


@pytest.mark.parametrize("case", QUANT_CASES)
def test_quantized_graph_is_exact_on_fake_quantized_weights(case, tiny_hf, tmp_path):
    """With fp32 activations (accuracy_level 0) the graph equals torch on dequantized weights,
    embedding included: any layout slip (nibbles, scales, fused rows) shows here."""
    arch, kw, quant = QUANT_CASES[case]
    folder = tiny_hf(arch, **kw)
    model, spec = export(folder, tmp_path, accuracy_level=0, block_size=32, **quant)
    bits = 8 if quant["weights"] == "int8" else 4
    torch_model = hf_model(folder)
    with torch.no_grad():
        for p in torch_model.parameters():
            if p.dim() == 2:
                q = quantize_nbits(p.numpy(), bits, 32, quant.get("symmetric", True))
                p.copy_(torch.from_numpy(dequantize(q)))
    ref_tokens, ref_logits = hf_greedy(torch_model, PROMPT, 16)
    logits = FastGraphRunner(model, spec).teacher_forced(PROMPT, ref_tokens)
    np.testing.assert_allclose(np.stack(logits), ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)


TRAIN_TEXT = " ".join(_CORPUS[:4])


@pytest.fixture(scope="module")
def trained_tiny(tiny_hf, tmp_path_factory) -> Path:
    """A tiny llama that memorised TRAIN_TEXT in a second: confident, like a real model on its data."""
    out = Path(shutil.copytree(tiny_hf("llama", tie_embeddings=False), tmp_path_factory.mktemp("trained") / "m"))
    ids = torch.tensor(build_tokenizer().encode(TRAIN_TEXT).ids)[None]
    model = hf_model(out).train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toy model trains fastest on one thread
    try:
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(40):
            loss = model(ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.1
    model.save_pretrained(out, safe_serialization=True)
    return out


def test_int4_keeps_greedy_answers(trained_tiny, tmp_path):
    prompt = build_tokenizer().encode(TRAIN_TEXT).ids[:8]
    model, spec = export(trained_tiny, tmp_path, weights="int4", block_size=32, accuracy_level=4)
    ref_tokens, _ = hf_greedy(hf_model(trained_tiny), prompt, 32)
    # Teacher-forced along transformers' sequence, so one early flip cannot cascade.
    logits = FastGraphRunner(model, spec).teacher_forced(prompt, ref_tokens)
    agree = np.mean([int(np.argmax(row)) == t for row, t in zip(logits, ref_tokens)])
    assert agree >= 0.9, f"int4 agrees with transformers on {agree:.0%} of 32 positions"


def test_fp16_weights_stay_close(tiny_hf, tmp_path):
    folder = tiny_hf("llama", tie_embeddings=False)
    model, spec = export(folder, tmp_path / "fp16", weights="fp16")
    fp32_model, _ = export(folder, tmp_path / "fp32", weights="fp32")
    ref_tokens, ref_logits = hf_greedy(hf_model(folder), PROMPT, 16)
    logits = FastGraphRunner(model, spec).teacher_forced(PROMPT, ref_tokens)
    np.testing.assert_allclose(np.stack(logits), ref_logits, atol=1e-2 * np.abs(ref_logits).max(), rtol=0)
    size = lambda m: (m.parent / "model.onnx.data").stat().st_size  # noqa: E731
    assert size(model) < 0.6 * size(fp32_model)


def test_chunked_prefill_and_logits_to_keep(tiny_hf, tmp_path):
    model, spec = export(tiny_hf("qwen3"), tmp_path, weights="fp32")
    seq = PROMPT + [40, 41, 42, 43, 44]
    whole = FastGraphRunner(model, spec).step(seq, keep=len(seq))
    assert whole.shape == (len(seq), spec.vocab_size)
    chunked = FastGraphRunner(model, spec)
    first = chunked.step(seq[:5], keep=5)
    second = chunked.step(seq[5:], keep=len(seq) - 5)
    np.testing.assert_allclose(np.concatenate([first, second]), whole, atol=1e-5 * np.abs(whole).max())
    last3 = FastGraphRunner(model, spec).step(seq, keep=3)
    np.testing.assert_allclose(last3, whole[-3:], atol=1e-5 * np.abs(whole).max())


def test_graph_layout_and_progress(tiny_hf, tmp_path):
    """The node budget: 11 nodes a layer plus a fixed head and tail."""
    source = open_hf_folder(tiny_hf("llama"))
    calls = []
    info = build_fast_graph(source, QuantConfig(), tmp_path, lambda *a: calls.append(a))
    assert calls == [("layers", 1, 2), ("layers", 2, 2)]
    layers = source.spec.num_layers
    assert info.kind == "fast" and info.file == "model.onnx" and info.kv_dtype == "float32"
    assert info.inputs[:3] == ["input_ids", "attention_mask", "logits_to_keep"]
    assert info.outputs[:3] == ["logits", "present.0.key", "present.0.value"] and len(info.outputs) == 1 + 2 * layers
    graph = onnx.load(tmp_path / "model.onnx", load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["MatMulNBits"] == 4 * layers + 1 and ops["GroupQueryAttention"] == layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    # The head and tail: 12 of them dequantize the gathered int4 embedding rows.
    assert len(graph.node) == 11 * layers + 22
    # Tied: the embedding gathers lm_head's own codes and scales, stored once as they are
    # ([N, blocks, blob] and [N, blocks]; a reshaped table would be folded into a copy at load).
    gathers = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.name.startswith("/model/embed_tokens")}
    assert source.spec.tie_embeddings and gathers == {"lm_head.qweight", "lm_head.scales"}
    assert not any(t.name.startswith("model.embed_tokens") for t in graph.initializer)
    gqa = next(n for n in graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0 and gqa.output[1] == "present.0.key"


@pytest.mark.slow
def test_smollm2_int4_from_gguf(tmp_path):
    pytest.importorskip("gguf")
    from edgellm.export.api import open_source
    from edgellm.export.sources import resolve_builtin

    try:
        resolve_builtin("smollm2-135m")
        source = open_source("smollm2-135m")
    except (ExportError, ImportError) as exc:
        pytest.skip(f"SmolLM2 GGUF source unavailable: {exc}")
    build_fast_graph(source, QuantConfig(), tmp_path)
    graph = onnx.load(tmp_path / "model.onnx", load_external_data=False).graph
    # 11 a layer, plus 8 for the Q4_1 blocks' offsets (block sums MatMul, Concat per activation);
    # the embedding gathers lm_head's own 8-bit codes and scales and dequantizes them (7 nodes
    # where GatherBlockQuantized on a second copy of the table was 1 plus its Reshape). Counted
    # as onnxruntime runs them: the Casts and Concats of the float16 GGUF scales fold at load.
    constant, left = {t.name for t in graph.initializer}, 0
    for node in graph.node:
        if all(i in constant for i in node.input if i):
            constant.update(node.output)
        else:
            left += 1
    assert left <= 19 * 30 + 17
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(source.tokenizer_json)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    tokens, _ = FastGraphRunner(tmp_path / "model.onnx", source.spec, 128).greedy(tok.encode(text).ids, 12)
    assert "Paris" in tok.decode(tokens)

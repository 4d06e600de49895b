"""Gemma 3 text on the fast graph, from a HF folder and from GGUF, against transformers.

The tiny model (tests/tiny.py) has sliding, sliding, global layers, a window of 4 under a
7-token prompt and a softmax scalar that is not head_dim, so the window edge, the two
rotary caches, the sandwich norms and the scale are all crossed in the first decode steps.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from edgellm.errors import ExportError
from edgellm.export.arch import gemma3
from edgellm.export.gguf import open_gguf
from edgellm.export.config import QuantConfig
from edgellm.export.graph import build_fast_graph
from arch_checks import STEPS, assert_greedy_matches, assert_int4_exact
from gguf_writer import write_tiny_gguf
from ort_loop import FastGraphRunner
from test_graph import PROMPT, export, hf_greedy, hf_model


@pytest.fixture(scope="module")
def folder(tiny_hf) -> Path:
    return tiny_hf("gemma3", num_layers=4)


def test_spec_reads_gemma3_choices(folder):
    config = json.loads((folder / "config.json").read_text())
    spec = gemma3.read_hf(config, folder / "config.json")
    assert spec.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert (spec.sliding_window, spec.rope_local_theta, spec.rope_theta) == (4, 10000.0, 1e6)
    assert spec.attention_scale == pytest.approx(24 ** -0.5) and spec.embedding_scale == 8.0
    assert spec.qk_norm and spec.activation == "gelu_tanh" and spec.tie_embeddings
    layers = [gemma3.layer(spec, i) for i in range(4)]
    assert [la.window for la in layers] == [4, 4, None, 4]
    assert [la.rope.name for la in layers] == ["local", "local", "", "local"]


def test_fp32_greedy_matches_transformers_across_the_window(folder, tmp_path):
    model, spec = export(folder, tmp_path, weights="fp32")
    assert_greedy_matches(model, spec, hf_model(folder))


def test_int4_is_exact_on_fake_quantized_weights(folder, tmp_path):
    """fp32 activations (accuracy_level 0): the graph equals torch on the dequantized weights."""
    assert_int4_exact(folder, tmp_path)


def test_bundle_quantizes_the_head(tiny_bundle_factory):
    import onnx

    bundle = tiny_bundle_factory("gemma3", "int4", num_layers=4)
    graph = onnx.load(bundle / "model.onnx", load_external_data=False).graph
    head = next(n for n in graph.node if "logits" in n.output)
    assert head.op_type == "MatMulNBits"
    assert {i.name for i in graph.initializer} >= {"cos_cache", "cos_cache_local"}


@pytest.mark.parametrize("field, value", [("final_logit_softcapping", 30.0), ("hidden_activation", "gelu")])
def test_unsupported_choices_are_named(folder, field, value):
    config = {**json.loads((folder / "config.json").read_text()), field: value}
    with pytest.raises(ExportError, match=field):
        gemma3.read_hf(config, folder / "config.json")


# --- GGUF ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_folder(tiny_hf, tmp_path_factory) -> Path:
    """Six layers under llama.cpp's fixed conventions: every 6th layer global, scalar = head_dim."""
    folder = Path(shutil.copytree(tiny_hf("gemma3", num_layers=6), tmp_path_factory.mktemp("g3") / "hf"))
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = ["sliding_attention"] * 5 + ["full_attention"]
    config["query_pre_attn_scalar"] = config["head_dim"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_gguf_f32_matches_transformers(gguf_folder, tmp_path):
    source = open_gguf(write_tiny_gguf(gguf_folder, tmp_path / "g.gguf", qtypes={}))
    hf_spec = gemma3.read_hf(json.loads((gguf_folder / "config.json").read_text()), gguf_folder)
    assert source.spec.rms_norm_eps == pytest.approx(hf_spec.rms_norm_eps)  # stored float32
    assert dataclasses.replace(source.spec, rms_norm_eps=hf_spec.rms_norm_eps) == hf_spec
    build_fast_graph(source, QuantConfig(weights="fp32"), tmp_path)
    assert_greedy_matches(tmp_path / "model.onnx", source.spec, hf_model(gguf_folder))


def test_gguf_quantized_blocks_import_exactly(gguf_folder, tmp_path):
    """Q8_0/Q4_0/Q4_1 blocks imported as they are: the graph equals its own fp32 graph of the
    dequantized GGUF weights (accuracy_level 0), with Gemma's names and +1 norms."""
    Q = GGMLQuantizationType
    qtypes = {"q_proj.weight": Q.Q8_0, "k_proj.weight": Q.Q4_0, "v_proj.weight": Q.Q4_1, "o_proj.weight": Q.Q4_0,
              "gate_proj.weight": Q.Q4_1, "up_proj.weight": Q.Q4_0, "down_proj.weight": Q.Q8_0,
              "embed_tokens.weight": Q.Q8_0}
    source = open_gguf(write_tiny_gguf(gguf_folder, tmp_path / "g.gguf", qtypes))
    assert {t for name, t in source.stored_types.items() if "norm" not in name} == {"Q8_0", "Q4_0", "Q4_1"}
    for name, weights in (("q", "int4"), ("f", "fp32")):
        (tmp_path / name).mkdir()
        build_fast_graph(source, QuantConfig(weights=weights, accuracy_level=0), tmp_path / name)
    exact = FastGraphRunner(tmp_path / "q" / "model.onnx", source.spec).greedy(PROMPT, STEPS)
    reference = FastGraphRunner(tmp_path / "f" / "model.onnx", source.spec).greedy(PROMPT, STEPS)
    assert exact[0] == reference[0]
    np.testing.assert_allclose(np.stack(exact[1]), np.stack(reference[1]), atol=1e-3, rtol=0)


def test_gguf_without_template_gets_gemmas(gguf_folder, tmp_path):
    folder = Path(shutil.copytree(gguf_folder, tmp_path / "hf"))
    (folder / "chat_template.jinja").unlink()
    source = open_gguf(write_tiny_gguf(folder, tmp_path / "g.gguf", qtypes={}))
    assert source.chat_template == gemma3.CHAT_TEMPLATE
    assert source.describe()["chat_template"] == "gemma3 family default"


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_image_text_checkpoint_exports_its_text_decoder(folder, tmp_path, prefix):
    """Gemma3ForConditionalGeneration: config under text_config, decoder tensors under a prefix,
    a vision tower beside them that the text graph never reads."""
    from safetensors.numpy import load_file, save_file

    mm = Path(shutil.copytree(folder, tmp_path / "mm"))
    text = json.loads((folder / "config.json").read_text())
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures": [
        "Gemma3ForConditionalGeneration"], "text_config": text, "vision_config": {"hidden_size": 8}}))
    weights = load_file(folder / "model.safetensors")
    renamed = {prefix + n.removeprefix("model."): w for n, w in weights.items()}
    renamed["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((8, 3), np.float32)
    save_file(renamed, mm / "model.safetensors", metadata={"format": "pt"})
    model, spec = export(mm, tmp_path / "out", weights="fp32")
    assert spec == gemma3.read_hf(text, folder)
    assert_greedy_matches(model, spec, hf_model(folder))


def test_runtime_generates_transformers_tokens(folder, tiny_bundle_factory):
    """The whole pipeline: export_model's bundle, loaded by edgellm, decoding past the window."""
    import edgellm

    bundle = tiny_bundle_factory("gemma3", "fp32", num_layers=4)
    got = edgellm.load(bundle, threads=1).generate(PROMPT, max_new_tokens=STEPS, ignore_eos=True).token_ids
    assert got == hf_greedy(hf_model(folder), PROMPT, STEPS)[0]


def test_gguf_sentencepiece_vocabulary_encodes_as_sentencepiece():
    """Gemma's GGUF vocabulary: SentencePiece BPE without a dummy prefix, byte fallback, turn
    markers as user-defined tokens; encoded like the reference encoder, turns included."""
    import io

    import sentencepiece as spm

    from edgellm.export.gguf_vocab import build_tokenizer
    from test_gguf import TEXTS

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 20), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if sp.id_to_piece(i).endswith("_of_turn>") else 1 for i in range(n)]
    meta = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False,
    }
    tok = build_tokenizer(meta)
    turn = "<start_of_turn>user\nWhat is the capital of France? 🙂<end_of_turn>\n<start_of_turn>model\n"
    for text in [*TEXTS, turn, " two  spaces", "Zebra ÿ"]:
        assert tok.encode(text).ids == sp.encode(text), text
        assert tok.decode(sp.encode(text), skip_special_tokens=False) == text

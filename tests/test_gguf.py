"""export/gguf.py: GGUF metadata -> ModelSpec, tensors in HF layout, tokenizer from metadata."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import jinja2
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from edgellm.errors import ExportError
from edgellm.export.gguf import EXACT_TYPES, open_gguf
from edgellm.export.gguf_vocab import build_tokenizer
from edgellm.export.sources import resolve_builtin

from gguf_writer import DEFAULT_QTYPES, llama_cpp_permute, write_tiny_gguf

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "café, naïve, Ærøskøbing",
    "日本語のテキスト",
    "emoji 🙂🚀 and 12345 digits",
    "<|im_start|>user\nHi there<|im_end|>",
]


# ---- the shipped SmolLM2-135M-Instruct Q4_1 GGUF ----------------------------------------


@pytest.fixture(scope="module")
def smol_path() -> Path:
    try:
        return resolve_builtin("smollm2-135m")
    except ExportError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def smol(smol_path):
    return open_gguf(smol_path)


@pytest.fixture(scope="module")
def smol_tok(smol) -> Tokenizer:
    return Tokenizer.from_str(smol.tokenizer_json)


def test_smollm2_spec(smol):
    s = smol.spec
    assert (s.arch, s.num_layers, s.hidden_size, s.intermediate_size) == ("llama", 30, 576, 1536)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size) == (9, 3, 64, 49152)
    assert (s.max_context, s.rope_theta, s.rope_scaling) == (8192, 100000.0, None)
    assert s.rms_norm_eps == pytest.approx(1e-5)
    assert s.tie_embeddings and not s.attention_bias and not s.qk_norm
    assert "lm_head.weight" not in smol.names()
    assert len(smol.names()) == 272


def test_smollm2_known_ids(smol, smol_tok):
    vocab = smol_tok.get_vocab()
    assert smol_tok.encode("Hello world").ids == [vocab["Hello"], vocab["Ġworld"]]
    assert smol_tok.encode("2024").ids == [vocab[d] for d in "2024"]
    # The vocabulary has no multi-digit tokens, so ids alone cannot show the digit split.
    assert [p for p, _ in smol_tok.pre_tokenizer.pre_tokenize_str(" 2024")] == ["Ġ", "2", "0", "2", "4"]
    assert smol_tok.encode("<|im_end|>").ids == [2]
    assert smol_tok.encode("<|im_start|>user").ids == [1, vocab["user"]]
    assert smol_tok.encode("Hi").ids == [vocab["Hi"]]  # no BOS added


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_round_trip(smol_tok, text):
    assert smol_tok.decode(smol_tok.encode(text).ids, skip_special_tokens=False) == text


def test_smollm2_generation_and_template(smol):
    gen = smol.generation
    assert gen["eos_token_ids"] == [2] and gen["eos_token"] == "<|im_end|>"
    assert (gen["bos_token_id"], gen["bos_token"], gen["add_bos_token"]) == (1, "<|im_start|>", False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = jinja2.Template(smol.chat_template).render(messages=messages, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_unpermute_is_inverse(smol):
    raw = {t.name: t for t in smol.reader.tensors}
    for layer in (0, 29):
        for part, heads in (("q", 9), ("k", 3)):
            name = f"model.layers.{layer}.self_attn.{part}_proj.weight"
            stored = raw[f"blk.{layer}.attn_{part}.weight"]
            hf = smol.tensor(name)
            assert hf.shape == ((heads * 64, 576))
            assert np.array_equal(llama_cpp_permute(hf, heads), dequantize(stored.data, stored.tensor_type))
            blocks = smol.quant_blocks(name)
            assert blocks.ggml_type == "Q4_1" and blocks.shape == (heads * 64, 576)
            assert np.array_equal(llama_cpp_permute(blocks.data, heads), stored.data)
            assert not np.array_equal(blocks.data, stored.data)  # the permutation is not the identity


def test_smollm2_describe_and_blocks(smol, smol_path):
    d = smol.describe()
    assert d["kind"] == "gguf" and d["path"] == str(smol_path)
    assert d["sha256"] == hashlib.sha256(smol_path.read_bytes()).hexdigest()
    assert d["file_type"] == "MOSTLY_Q4_1"
    assert d["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    embed = smol.quant_blocks("model.embed_tokens.weight")
    assert (embed.ggml_type, embed.shape, embed.data.shape) == ("Q8_0", (49152, 576), (49152, 18 * 34))
    assert smol.quant_blocks("model.norm.weight") is None
    with pytest.raises(ExportError, match="lm_head.weight"):
        smol.tensor("lm_head.weight")


# ---- tiny GGUFs written from tiny HF checkpoints ---------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_hf):
    """arch -> (HF folder, GGUF path), built once for the module."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        folder = tiny_hf(arch)
        out[arch] = folder, write_tiny_gguf(folder, root / f"{arch}.gguf")
    return out


def _check_tensors(folder: Path, path: Path, qtypes: dict) -> None:
    """F32 tensors come back bit-exact, the others as gguf-py's own dequantization."""
    source = open_gguf(path)
    weights = load_file(folder / "model.safetensors")
    assert sorted(source.names()) == sorted(weights)
    converted = 0
    for name, expected in weights.items():
        qtype = next((t for suffix, t in qtypes.items() if name.endswith(suffix)), None)
        got = source.tensor(name)
        assert got.dtype == np.float32 and got.shape == expected.shape, name
        if qtype is None:
            assert np.array_equal(got, expected), name
            assert source.quant_blocks(name) is None
            continue
        converted += 1
        stored = quantize(expected, qtype)
        assert np.array_equal(got, dequantize(stored, qtype)), name
        blocks = source.quant_blocks(name)
        if qtype.name in EXACT_TYPES:
            assert (blocks.ggml_type, blocks.shape) == (qtype.name, expected.shape), name
            assert np.array_equal(blocks.data, stored), name
        else:
            assert blocks is None, name
    assert converted == len(qtypes) * 2  # every listed suffix, in both layers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_tensors(tiny, arch):
    _check_tensors(*tiny[arch], DEFAULT_QTYPES)


def test_tiny_tensors_other_types(tiny_hf, tmp_path):
    qtypes = {
        "self_attn.v_proj.weight": Q.F16,
        "self_attn.o_proj.weight": Q.BF16,
        "mlp.up_proj.weight": Q.Q5_0,
        "mlp.down_proj.weight": Q.Q5_1,
    }
    folder = tiny_hf("llama")
    _check_tensors(folder, write_tiny_gguf(folder, tmp_path / "m.gguf", qtypes), qtypes)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_spec_matches_config(tiny, arch):
    folder, path = tiny[arch]
    config = json.loads((folder / "config.json").read_text())
    spec = open_gguf(path).spec
    assert spec.arch == arch
    assert spec.num_layers == config["num_hidden_layers"]
    assert spec.hidden_size == config["hidden_size"]
    assert spec.intermediate_size == config["intermediate_size"]
    assert spec.num_heads == config["num_attention_heads"]
    assert spec.num_kv_heads == config["num_key_value_heads"]
    assert spec.head_dim == config["head_dim"]
    assert spec.vocab_size == config["vocab_size"]
    assert spec.max_context == config["max_position_embeddings"]
    assert spec.rope_theta == config["rope_theta"]
    assert spec.rms_norm_eps == pytest.approx(config["rms_norm_eps"])
    assert spec.tie_embeddings == config["tie_word_embeddings"]
    assert spec.attention_bias == (arch == "qwen2")
    assert spec.qk_norm == (arch == "qwen3")
    assert spec.rope_scaling is None


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_matches_hf(tiny, text):
    folder, path = tiny["llama"]
    source = open_gguf(path)
    ours = Tokenizer.from_str(source.tokenizer_json)
    theirs = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert ours.encode(text).ids == theirs.encode(text).ids
    assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    assert source.generation["eos_token_ids"] == [2]
    assert source.generation["pad_token_id"] == 0


def test_unpermute_on_uneven_heads(tiny_hf, tmp_path):
    """8 q heads, 2 kv heads: an inverse that mixed up the two reshape axes fails here."""
    folder = tiny_hf("llama", num_heads=8, num_kv_heads=2)
    path = write_tiny_gguf(folder, tmp_path / "m.gguf", qtypes={})
    source = open_gguf(path)
    weights = load_file(folder / "model.safetensors")
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert np.array_equal(source.tensor(name), weights[name])


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
         "original_max_position_embeddings": 256},
        {"rope_type": "linear", "factor": 2.0},
    ],
    ids=lambda s: s["rope_type"],
)
def test_rope_scaling_round_trip(tiny_hf, tmp_path, scaling):
    folder = tiny_hf("llama" if scaling["rope_type"] == "llama3" else "qwen2", rope_scaling=scaling)
    got = open_gguf(write_tiny_gguf(folder, tmp_path / "m.gguf")).spec.rope_scaling
    assert got == pytest.approx(scaling)


def test_rope_scaling_the_graph_cannot_build_is_refused_on_reading(tiny_hf, tmp_path):
    """As from a HF folder: yarn is refused when read, not later by the graph builder."""
    folder = tiny_hf("qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    _expect_error(write_tiny_gguf(folder, tmp_path / "m.gguf"), "qwen2.rope.scaling.type 'yarn' is not supported")


# ---- pre-tokenizers and SentencePiece ------------------------------------------------------


@pytest.mark.parametrize(
    "pre, expected",
    [
        # GPT-2: contractions lowercase only, digit runs whole.
        ("gpt-2", ["I", "'", "M", "Ġ12345", "Ġok", "ĊĊ"]),
        ("smollm", ["I", "'", "M", "Ġ", "1", "2", "3", "4", "5", "Ġok", "ĊĊ"]),
        # qwen2: contractions any case, one digit per token.
        ("qwen2", ["I", "'M", "Ġ", "1", "2", "3", "4", "5", "Ġok", "ĊĊ"]),
        # llama3: digits in runs of up to three.
        ("llama-bpe", ["I", "'M", "Ġ", "123", "45", "Ġok", "ĊĊ"]),
    ],
)
def test_pre_tokenizers(pre, expected):
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": ["a"],
            "tokenizer.ggml.merges": []}
    tok = build_tokenizer(meta)
    assert [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str("I'M 12345 ok\n\n")] == expected


def _spm_meta() -> tuple[dict, object]:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 20), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    # llama.cpp's token types, as its converter assigns them from the SentencePiece model.
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    return meta, sp


def test_sentencepiece_matches_spm():
    meta, sp = _spm_meta()
    tok = build_tokenizer(meta)
    for text in TEXTS[:-1] + ["Zebra ÿ 🙂", " one leading space"]:
        ids = sp.encode(text)
        assert tok.encode(text).ids == [sp.bos_id(), *ids], text  # add_bos defaults on for SPM
        assert tok.decode(ids) == text
    assert tok.encode("</s>", add_special_tokens=False).ids == [sp.eos_id()]
    meta["tokenizer.ggml.add_bos_token"] = False
    assert build_tokenizer(meta).encode("Paris").ids == sp.encode("Paris")


# ---- bad input -----------------------------------------------------------------------------


def _expect_error(path: Path, match: str) -> None:
    with pytest.raises(ExportError, match=match) as info:
        open_gguf(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.gguf", "no such file")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(64))
    _expect_error(path, "not a GGUF file")


@pytest.mark.parametrize("keep", [6, 100, 0.5, 0.999])
def test_truncated(tiny, tmp_path, keep):
    data = tiny["llama"][1].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    _expect_error(path, "truncated|not supported")


def test_unsupported_version(tiny, tmp_path):
    data = tiny["llama"][1].read_bytes()
    path = tmp_path / "v9.gguf"
    path.write_bytes(data[:4] + (9).to_bytes(4, "little") + data[8:])
    _expect_error(path, "version 9")


def test_unknown_architecture(tiny, tmp_path):
    path = write_tiny_gguf(tiny["llama"][0], tmp_path / "f.gguf", arch="falcon")
    _expect_error(path, "'falcon'")


def test_unknown_pre_tokenizer(tiny, tmp_path):
    path = write_tiny_gguf(tiny["llama"][0], tmp_path / "p.gguf", pre="mystery-bpe")
    _expect_error(path, "'mystery-bpe'")

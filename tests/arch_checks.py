"""Checks every fast-graph family's tests make against transformers (tests/test_gemma3.py, test_phi3.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgellm.export.quantize import dequantize, quantize_nbits
from ort_loop import FastGraphRunner
from test_graph import PROMPT, export, hf_greedy, hf_model

STEPS = 32


def assert_greedy_matches(model: Path, spec, torch_model) -> None:
    """Greedy tokens identical over PROMPT and STEPS decode steps; logits within float32
    reassociation, 1e-5 of the logit scale (measured 1e-6 to 4e-6)."""
    ref_tokens, ref_logits = hf_greedy(torch_model, PROMPT, STEPS)
    tokens, logits = FastGraphRunner(model, spec).greedy(PROMPT, STEPS)
    assert tokens == ref_tokens
    np.testing.assert_allclose(np.stack(logits), ref_logits, atol=1e-5 * np.abs(ref_logits).max(), rtol=0)


def assert_int4_exact(folder: Path, out: Path) -> None:
    """With fp32 activations (accuracy_level 0) the int4 graph equals torch on the dequantized
    weights, teacher-forced along torch's greedy tokens: any layout slip shows here."""
    model, spec = export(folder, out, weights="int4", accuracy_level=0, block_size=32)
    torch_model = hf_model(folder)
    with torch.no_grad():
        for p in torch_model.parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(dequantize(quantize_nbits(p.numpy(), 4, 32, True))))
    ref_tokens, ref_logits = hf_greedy(torch_model, PROMPT, STEPS)
    logits = FastGraphRunner(model, spec).teacher_forced(PROMPT, ref_tokens)
    np.testing.assert_allclose(np.stack(logits), ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)

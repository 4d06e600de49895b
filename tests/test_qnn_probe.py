"""The static-shape decoder step of benchmarks/qnn_probe.py runs whole on QNN's HTP (simulated on x86)
with CPU fallback disabled, and its greedy tokens are the CPU provider's: the recipe an NPU export
must follow, kept honest by running it."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime_qnn", reason="the qnn extra is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import qnn_probe as qp  # noqa: E402

PAST = 16
STEPS = 8


@pytest.mark.parametrize("fmt", ["float", "nbits"])
def test_a_static_decoder_step_runs_whole_on_the_htp_with_the_cpu_tokens(tmp_path, fmt):
    path = qp.save(qp.decoder(qp.TINY, PAST, fmt=fmt), tmp_path, f"decoder_{fmt}")
    session, placed = qp.qnn_session(path, fallback=False)
    assert (placed.qnn_nodes, placed.partitions, placed.left) == (placed.total_nodes, 1, [])
    assert placed.total_nodes > 100  # two layers' worth of nodes, not a trace of some fragment
    got, _ = qp.Stepper(session, qp.TINY, PAST).greedy(1, STEPS)
    want, _ = qp.Stepper(qp.cpu_session(path), qp.TINY, PAST).greedy(1, STEPS)
    assert got == want
    assert len(set(want)) > 1  # a model stuck on one token would agree trivially


def test_a_dynamic_dimension_is_left_to_the_cpu(tmp_path):
    g = qp.Graph()
    g.op("MatMul", g.input("x", np.float32, ["seq", 8]), g.const(np.ones((8, 8), np.float32)), out="y")
    _, placed = qp.qnn_session(qp.save(g.model(["y"]), tmp_path, "dynamic"))
    assert (placed.qnn_nodes, placed.left) == (0, ["MatMul"])

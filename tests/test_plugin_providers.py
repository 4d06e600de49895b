"""Accelerators as onnxruntime plugin execution providers: registration, device choice, and
falling back to the CPU with a one-line reason whatever goes wrong."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import edgellm
from edgellm.runtime import providers as sess

PROMPT = "The quick brown"


def reasons(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "edgellm" and r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def cpu_tokens(tiny_bundle) -> list[int]:
    return edgellm.load(tiny_bundle).generate(PROMPT, max_new_tokens=12).token_ids


def test_a_plugin_whose_package_is_missing_falls_back_with_the_extra_to_install(tiny_bundle, caplog, monkeypatch,
                                                                                  cpu_tokens):
    monkeypatch.setitem(sess.PLUGINS, "OpenVINOExecutionProvider", ("edgellm_no_such_plugin", "openvino"))
    model = edgellm.load(tiny_bundle, providers=["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    assert model.providers == ["CPUExecutionProvider"]
    assert reasons(caplog) == ['provider OpenVINOExecutionProvider is a plugin and its package '
                               'edgellm_no_such_plugin is not installed (pip install "edgellm[openvino]"); '
                               'trying the next']
    assert model.generate(PROMPT, max_new_tokens=12).token_ids == cpu_tokens


def test_the_openvino_plugin_runs_where_it_has_a_device_and_says_so_where_not(tiny_bundle, caplog, cpu_tokens):
    ov = pytest.importorskip("onnxruntime_ep_openvino", reason="the openvino extra is not installed")
    model = edgellm.load(tiny_bundle, providers=[("OpenVINOExecutionProvider", {"devices": "NPU,GPU,CPU"}),
                                                 "CPUExecutionProvider"])
    devices = [d for d in sess.available_devices() if d[0] == ov.get_ep_name() and d[1]]
    if devices:  # OpenVINO claims Intel hardware only
        assert model.providers[0] == "OpenVINOExecutionProvider", reasons(caplog)
    else:
        assert model.providers == ["CPUExecutionProvider"]
        assert reasons(caplog) == ["provider OpenVINOExecutionProvider offers no device on this machine; "
                                   "trying the next"]
    assert model.generate(PROMPT, max_new_tokens=12).token_ids == cpu_tokens


def test_the_qnn_htp_simulator_gives_the_cpu_tokens(tiny_bundle, caplog, cpu_tokens):
    pytest.importorskip("onnxruntime_qnn", reason="the qnn extra is not installed")
    model = edgellm.load(tiny_bundle, providers=[
        ("QNNExecutionProvider", {"backend_path": "{package}/libQnnHtp.so", "devices": "NPU,CPU"}),
        "CPUExecutionProvider"])
    assert model.providers[0] == "QNNExecutionProvider", reasons(caplog)
    assert model.generate(PROMPT, max_new_tokens=12).token_ids == cpu_tokens


def test_a_device_that_fails_on_the_graph_is_skipped(tiny_bundle, caplog, cpu_tokens):
    pytest.importorskip("onnxruntime_qnn", reason="the qnn extra is not installed")
    # QNN refuses fp16 precision without a soc_model when the session is created.
    model = edgellm.load(tiny_bundle, providers=[
        ("QNNExecutionProvider", {"backend_path": "{package}/libQnnHtp.so", "devices": "CPU",
                                  "enable_htp_fp16_precision": "1"}),
        "CPUExecutionProvider"])
    assert model.providers == ["CPUExecutionProvider"]
    lines = reasons(caplog)
    assert len(lines) == 2 and lines[0].startswith("provider QNNExecutionProvider on its CPU device failed to open "
                                                   "model.onnx (") and "soc_model" in lines[0]
    assert lines[1] == ("provider QNNExecutionProvider opened model.onnx on none of its devices CPU (has CPU); "
                        "trying the next")
    assert model.generate(PROMPT, max_new_tokens=12).token_ids == cpu_tokens


def test_edgellm_devices_lists_what_this_machine_has():
    res = subprocess.run([sys.executable, "-m", "edgellm.cli", "devices"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    listed = res.stdout.split("execution providers and devices on this machine:")[1].splitlines()
    assert any(line.split()[:2] == ["CPUExecutionProvider", "CPU"] for line in listed), listed

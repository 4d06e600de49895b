"""End-to-end export: bundles written whole or not at all, bad input refused in one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.runtime.bundle import read_manifest
from edgellm.errors import ExportError
from edgellm.export.api import export_model
from edgellm.export.config import QuantConfig


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_bundle_is_self_describing(tiny_hf, tmp_path):
    out = tmp_path / "b"
    manifest = export_model(tiny_hf("qwen2"), out, quant=QuantConfig("int4"))
    on_disk = read_manifest(out)  # verifies every checksum
    assert on_disk.to_dict() == manifest.to_dict()
    assert {"model.onnx", "tokenizer.json", "chat_template.jinja"} <= set(manifest.files)
    assert manifest.spec.arch == "qwen2" and manifest.spec.attention_bias
    assert manifest.graph.kind == "fast"
    assert manifest.quantization["weights"] == "int4" and manifest.quantization["block_size"] == 32
    assert manifest.generation["eos_token_ids"] == [2]
    assert manifest.source["kind"] == "hf" and len(manifest.source["sha256"]) == 64
    assert manifest.exporter["onnxruntime"]
    q = manifest.quality
    assert q["tokens"] > 50 and q["perplexity"] > 1 and q["source_perplexity"] > 1
    assert q["ratio"] == pytest.approx(q["perplexity"] / q["source_perplexity"], rel=1e-3)
    assert _leftovers(tmp_path) == ["b"]
    assert out.stat().st_mode & 0o777 == 0o755  # readable by a service user, like any install


def test_existing_output_needs_force(tiny_hf, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="already exists"):
        export_model(tiny_hf("llama"), out, quant=QuantConfig("fp32"), evaluate=False)
    assert (out / "keep.txt").read_text() == "user data"
    export_model(tiny_hf("llama"), out, quant=QuantConfig("fp32"), evaluate=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert _leftovers(tmp_path) == ["b"]


def test_failed_export_leaves_nothing(tiny_hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf("llama"), src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="model.safetensors"):
        export_model(src, out, evaluate=False)
    assert _leftovers(tmp_path) == ["src"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
        (lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "mamba",
                        "architectures": ["MambaForCausalLM"]})), "mamba"),
    ],
    ids=["missing-config", "missing-tokenizer", "unknown-architecture"],
)
def test_bad_source_is_refused(tiny_hf, tmp_path, damage, message):
    src = tmp_path / "src"
    shutil.copytree(tiny_hf("llama"), src)
    damage(src)
    with pytest.raises(ExportError, match=message):
        export_model(src, tmp_path / "out", evaluate=False, via="fast")
    assert not (tmp_path / "out").exists()


def test_corrupt_gguf_is_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ExportError, match="bad.gguf"):
        export_model(bad, tmp_path / "out", evaluate=False)
    assert not (tmp_path / "out").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line(tmp_path):
    res = _cli("export", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "out"))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing-here" in lines[0], res.stderr


def test_cli_unwritable_output(tiny_hf, tmp_path):
    if os.geteuid() == 0:
        target = Path("/proc/edgellm-bundle")  # not writable even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    res = _cli("export", str(tiny_hf("llama")), "-o", str(target), "--quant", "fp32", "--no-eval")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert "cannot write" in lines[-1] and str(target) in lines[-1], res.stderr


def test_cli_export_shows_progress_and_quality(tiny_hf, tmp_path):
    # Random weights: whether int4 passes the gate is chance, so the bundle is written either way.
    res = _cli("export", str(tiny_hf("qwen3")), "-o", str(tmp_path / "b"), "--quant", "int4", "--allow-quality-loss")
    assert res.returncode == 0, res.stderr
    assert "perplexity" in res.stdout and "wrote" in res.stdout
    for stage in ("read", "layers", "evaluate", "write"):
        assert stage in res.stderr, res.stderr

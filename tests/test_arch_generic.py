"""The generic path reached the way users reach it: `edgellm export` on a HF folder whose
architecture has no fast graph (OLMo here), with and without `--via optimum`."""
from __future__ import annotations

import json

import pytest

import edgellm
from edgellm.runtime.bundle import read_manifest
from edgellm.cli.main import main
from edgellm.errors import ExportError

pytest.importorskip("optimum.exporters.onnx")
torch = pytest.importorskip("torch")

PROMPT = [5, 17, 33, 100, 7, 250, 3]
STEPS = 16


@pytest.fixture(scope="module")
def olmo(tiny_hf):
    return tiny_hf("olmo")


def _hf_greedy(folder) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("via", ["optimum", "auto"])
def test_cli_exports_an_architecture_without_fast_graph(via, olmo, tmp_path):
    out = tmp_path / "bundle"
    assert main(["export", str(olmo), "-o", str(out), "--quant", "fp32", "--no-eval", "--via", via]) == 0
    manifest = read_manifest(out)
    assert manifest.graph.kind == "generic" and manifest.spec.arch == "olmo"
    config = json.loads((olmo / "config.json").read_text())
    assert (manifest.spec.num_layers, manifest.spec.num_kv_heads) == (2, config["num_key_value_heads"])
    tokens = edgellm.load(out, threads=1).generate(PROMPT, max_new_tokens=STEPS, ignore_eos=True).token_ids
    assert tokens == _hf_greedy(olmo)


def test_fast_path_refuses_it_naming_the_fast_families(olmo, tmp_path):
    from edgellm.export.api import export_model

    with pytest.raises(ExportError, match=r"'olmo' has no fast graph \(fast: .*llama.*; try --via optimum\)"):
        export_model(olmo, tmp_path / "b", via="fast", evaluate=False)


def test_list_prints_families_sources_and_paths(capsys):
    assert main(["export", "--list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == {"llama", "qwen", "gemma3", "phi3", "other", "encoder"}
    assert "gemma3_text" in rows["gemma3"] and "fast" in rows["phi3"]
    assert "refused" in rows["other"] and rows["other"].endswith("optimum")
    assert "bert" in rows["encoder"] and "embedding bundle" in rows["encoder"]


def test_export_without_output_says_what_is_missing(olmo, capsys):
    assert main(["export", str(olmo)]) == 2
    assert "-o/--output are required" in capsys.readouterr().err

"""`edgellm export BASE --lora ADAPTER`: a PEFT LoRA adapter merged into the weights before
quantization. The judge is peft itself: the merged fp32 bundle's greedy tokens equal those of
transformers with the adapter attached (unmerged), on a tiny random llama whose adapter's B is
random too (PEFT initialises B to zero, which would make any merge, or none, pass)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import edgellm
from edgellm.cli.main import main
from edgellm.errors import ExportError
from edgellm.export.api import export_model
from edgellm.export.config import QuantConfig

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
PROMPTS = ["The quick brown fox", "What is the capital of France?"]


@pytest.fixture(scope="module")
def adapter(tiny_hf, tmp_path_factory) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM

    base = tiny_hf("llama")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(folder)
    return base, folder


def test_a_merged_bundle_reproduces_transformers_with_peft_token_for_token(adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base, folder = adapter
    manifest = export_model(base, tmp_path / "merged", quant=QuantConfig("fp32"), evaluate=False, lora=folder)
    plain = edgellm.load(export_model(base, tmp_path / "plain", quant=QuantConfig("fp32"), evaluate=False) and
                         tmp_path / "plain")
    merged = edgellm.load(tmp_path / "merged")
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    for prompt in PROMPTS:
        ids = merged.encode(prompt)
        with torch.no_grad():
            out = reference.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12,
                                     do_sample=False, pad_token_id=0)
        merged.reset()
        tokens = merged.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
        assert tokens == out[0, len(ids):].tolist(), prompt
        plain.reset()
        assert plain.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids != tokens  # the adapter matters
    recorded = manifest.source["lora"]
    weights = (folder / "adapter_model.safetensors").read_bytes()
    assert recorded["sha256"] == hashlib.sha256(weights).hexdigest() and recorded["path"] == str(folder)
    assert (recorded["r"], recorded["alpha"], recorded["weights"]) == (4, 16.0, 7 * 2)  # tiny llama: 2 layers
    assert json.loads((tmp_path / "merged" / "manifest.json").read_text())["source"]["lora"] == recorded


def test_an_adapter_that_cannot_be_merged_is_refused_in_one_line(adapter, tmp_path, capsys):
    base, folder = adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ExportError, match="use_dora is set"):
        export_model(base, tmp_path / "out", quant=QuantConfig("fp32"), evaluate=False, lora=dora)
    assert main(["export", str(base), "-o", str(tmp_path / "out"), "--lora", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "expected a PEFT adapter folder" in err, err
    assert not (tmp_path / "out").exists()

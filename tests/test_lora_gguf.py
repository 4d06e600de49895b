"""`edgellm export model.gguf --lora adapter.gguf`: llama.cpp's LoRA adapter file merged into a GGUF
base's weights before quantization. Two judges: peft (the merged fp32 bundle's greedy tokens equal
transformers with the adapter attached, unmerged) and llama.cpp itself (the same adapter loaded
beside the same GGUF). The adapter file is written here the way llama.cpp's convert_lora_to_gguf.py
writes it, independently of export/lora.py, and llama.cpp loading it is the check that it follows
llama.cpp's conventions (names, A/B layouts, the q/k row permutation of B)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from gguf import GGUFWriter
from safetensors.numpy import load_file

import edgellm
from edgellm.cli.main import main
from edgellm.errors import ExportError
from edgellm.export.api import export_model, open_source
from edgellm.export.config import QuantConfig
from gguf_writer import gguf_name, llama_cpp_permute, write_tiny_gguf

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
PROMPTS = ["The quick brown fox", "What is the capital of France?"]
STEPS = 12
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(peft_folder: Path, base: Path, out: Path, *, arch: str = "llama", adapter_type: str = "lora",
                  skip: Callable[[str], bool] = lambda name: False, rename: dict[str, str] | None = None,
                  dtype: type = np.float32) -> Path:
    """convert_lora_to_gguf.py's file for a PEFT folder: general.type 'adapter', adapter.type 'lora',
    adapter.lora.alpha, `<gguf name>.lora_a` [r, in] and `.lora_b` [out, r] (numpy order), B's rows
    permuted for llama's q and k as the converter's LoraTorchTensor permutes them. Tensors `skip`
    names are left out; `rename` renames GGUF stems (for the refusal tests); `dtype` float16 is the
    converter's default --outtype f16."""
    config = json.loads((base / "config.json").read_text())
    alpha = json.loads((peft_folder / "adapter_config.json").read_text())["lora_alpha"]
    w = GGUFWriter(str(out), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", adapter_type)
    w.add_float32("adapter.lora.alpha", float(alpha))
    for key, value in sorted(load_file(peft_folder / "adapter_model.safetensors").items()):
        name = key.removeprefix("base_model.model.")
        half = "lora_a" if ".lora_A." in name else "lora_b"
        name = name.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
        if half == "lora_b" and ".self_attn.q_proj." in name:
            value = llama_cpp_permute(value, config["num_attention_heads"])
        if half == "lora_b" and ".self_attn.k_proj." in name:
            value = llama_cpp_permute(value, config["num_key_value_heads"])
        stem = gguf_name(name)
        stem = (rename or {}).get(stem, stem)
        if not skip(f"{stem}.{half}"):
            w.add_tensor(f"{stem}.{half}", value.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def peft_adapter(base: Path, folder: Path, targets: list[str]) -> Path:
    """A random-B adapter (peft initialises B to zero: any merge, or none, would pass)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, target_modules=targets)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory) -> dict[str, Path]:
    base = tiny_hf("llama")
    root = tmp_path_factory.mktemp("lora-gguf")
    folder = peft_adapter(base, root / "peft", ALL)
    return {"hf": base, "peft": folder, "gguf": write_tiny_gguf(base, root / "base.gguf", qtypes={}),
            "adapter": write_adapter(folder, base, root / "adapter.gguf")}


@pytest.fixture(scope="module")
def merged(setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "bundle"
    export_model(setup["gguf"], out, quant=QuantConfig("fp32"), evaluate=False, lora=setup["adapter"])
    return out


def bundle_tokens(bundle: Path) -> dict[str, list[int]]:
    model = edgellm.load(bundle)
    tokens = {}
    for prompt in PROMPTS:
        model.reset()
        tokens[prompt] = model.generate(prompt, max_new_tokens=STEPS, ignore_eos=True).token_ids
    return tokens


def test_a_gguf_adapter_merged_into_a_gguf_base_reproduces_transformers_with_peft(setup, merged, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["hf"]), setup["peft"]).eval()
    model = edgellm.load(merged)
    got = bundle_tokens(merged)
    for prompt in PROMPTS:
        ids = model.encode(prompt)
        with torch.no_grad():
            out = reference.generate(input_ids=torch.tensor([ids]), max_new_tokens=STEPS, min_new_tokens=STEPS,
                                     do_sample=False, pad_token_id=0)
        assert got[prompt] == out[0, len(ids):].tolist(), prompt
    plain = tmp_path / "plain"
    export_model(setup["gguf"], plain, quant=QuantConfig("fp32"), evaluate=False)
    assert all(tokens != got[prompt] for prompt, tokens in bundle_tokens(plain).items())  # the adapter matters
    # The PEFT folder itself merges into the GGUF base too (HF names are the GGUF reader's names).
    via_peft = tmp_path / "via-peft"
    export_model(setup["gguf"], via_peft, quant=QuantConfig("fp32"), evaluate=False, lora=setup["peft"])
    assert bundle_tokens(via_peft) == got
    recorded = json.loads((merged / "manifest.json").read_text())["source"]["lora"]
    assert recorded == {"format": "gguf", "path": str(setup["adapter"]), "r": 4, "alpha": 16.0, "weights": 14,
                        "sha256": hashlib.sha256(setup["adapter"].read_bytes()).hexdigest()}


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_llama_cpp_with_the_same_adapter_gives_the_merged_bundles_tokens(setup, merged, tmp_path, dtype):
    """llama.cpp applies the adapter unmerged, W x + scale * B (A x), with a float32 KV cache here (its
    float16 default is a rounding of its own, not the adapter's). Measured against transformers +
    peft over the 2 x 12 greedy steps: float32 factors differ by at most 7.6e-6 in a logit, the
    smallest top-1 lead is 2,700 times that; float16 factors (the converter's default; ggml then
    rounds the activations to float16 too) by 1.1e-2, still 4.7 times below the smallest lead."""
    llama_cpp = pytest.importorskip("llama_cpp")
    adapter, bundle = setup["adapter"], merged
    if dtype is np.float16:
        adapter = write_adapter(setup["peft"], setup["hf"], tmp_path / "f16.gguf", dtype=np.float16)
        bundle = tmp_path / "f16-bundle"
        export_model(setup["gguf"], bundle, quant=QuantConfig("fp32"), evaluate=False, lora=adapter)
    llm = llama_cpp.Llama(model_path=str(setup["gguf"]), lora_path=str(adapter), n_ctx=128,
                          n_threads=1, verbose=False, logits_all=True,  # scores are kept only with logits_all
                          type_k=0, type_v=0)  # GGML_TYPE_F32
    model = edgellm.load(bundle)
    for prompt, expected in bundle_tokens(bundle).items():
        llm.reset()
        llm.eval(model.encode(prompt))
        tokens = []
        for _ in range(STEPS):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        assert tokens == expected, prompt


def test_a_quantized_gguf_base_keeps_the_blocks_it_can_and_says_what_the_merged_weights_became(setup, tmp_path):
    """The adapted weights are dequantized, merged and rounded afresh; the rest keep their exact import."""
    quantized = write_tiny_gguf(setup["hf"], tmp_path / "q.gguf")  # q Q8_0, k Q4_0, gate Q4_1, down Q4_0
    adapter = write_adapter(setup["peft"], setup["hf"], tmp_path / "qg.gguf",
                            skip=lambda name: ".attn_q." not in name and ".ffn_gate." not in name)
    source = open_source(quantized, lora=adapter)
    assert source.quant_blocks("model.layers.0.self_attn.q_proj.weight") is None
    assert source.quant_blocks("model.layers.0.self_attn.k_proj.weight") is not None
    manifest = export_model(quantized, tmp_path / "b", quant=QuantConfig(), evaluate=False, lora=adapter)
    notes = manifest.quantization["notes"]
    assert any(n.startswith("imported 4 Q4_0 tensors exactly") for n in notes), notes  # k and down, 2 layers
    assert any(n.startswith("re-quantized 2 Q8_0 tensors to int4") for n in notes), notes
    assert any(n.startswith("re-quantized 2 Q4_1 tensors to int4") for n in notes), notes
    assert ("LoRA (gguf adapter): 4 weights merged as W + scale * B @ A in float32 into the GGUF's dequantized "
            "values (2 Q4_1, 2 Q8_0): a merged weight is no longer its blocks") in " ".join(notes)


@pytest.fixture(scope="module")
def other(tiny_hf, tmp_path_factory) -> Path:
    """An adapter trained for a llama of another size."""
    base = tiny_hf("llama", hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    root = tmp_path_factory.mktemp("lora-other")
    return write_adapter(peft_adapter(base, root / "peft", ["q_proj", "v_proj"]), base, root / "other.gguf")


@pytest.mark.parametrize("case, expected", [
    ("arch", "an adapter for 'qwen2', and .* is 'llama'"),
    ("shape", r"model.layers.0.self_attn.q_proj.weight is \(64, 64\) in the base, \(32, 32\) in the adapter"),
    ("type", "adapter.type 'control_vector'; expected a LoRA adapter"),
    ("missing", "model.layers.1.self_attn.v_proj.weight has only its lora_a"),
    ("absent", "adapts 'blk.7.attn_v.weight', which .* does not have"),
    ("hf base", "a llama.cpp adapter GGUF merges into a GGUF base only"),
])
def test_an_adapter_that_does_not_fit_is_refused_before_anything_is_built(setup, other, tmp_path, case, expected):
    adapters = {
        "arch": lambda out: write_adapter(setup["peft"], setup["hf"], out, arch="qwen2"),
        "shape": lambda out: other,
        "type": lambda out: write_adapter(setup["peft"], setup["hf"], out, adapter_type="control_vector"),
        "missing": lambda out: write_adapter(setup["peft"], setup["hf"], out,
                                             skip=lambda name: name == "blk.1.attn_v.weight.lora_b"),
        "absent": lambda out: write_adapter(setup["peft"], setup["hf"], out,
                                            rename={"blk.1.attn_v.weight": "blk.7.attn_v.weight"}),
        "hf base": lambda out: setup["adapter"],
    }
    adapter = adapters[case](tmp_path / "a.gguf")
    with pytest.raises(ExportError, match=expected):
        open_source(setup["hf"] if case == "hf base" else setup["gguf"], lora=adapter)


def test_the_command_line_refuses_in_one_line_and_writes_nothing(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(setup["gguf"]), "-o", str(out), "--lora", str(setup["gguf"])]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "general.type None, adapter.type None; expected a LoRA adapter" in err, err
    assert not out.exists()
    # And an adapter given as the model says where it belongs.
    with pytest.raises(ExportError, match="a LoRA adapter, not a model"):
        open_source(setup["adapter"])

"""What a bundle holds: every weight once, and nothing sized by positions it never runs at."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

import edgellm
from edgellm.errors import ExportError
from edgellm.export.api import export_model
from edgellm.export.config import QuantConfig
from gguf_writer import write_tiny_gguf

# One layer whose rows are whole blocks, so the tied Q8_0 embedding is a large share of the file.
SHAPE = dict(hidden_size=256, intermediate_size=256, num_layers=1)
QTYPES = {"embed_tokens.weight": Q.Q8_0, **{f"{p}.weight": Q.Q4_0 for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}}


def _initializers(bundle: Path) -> dict[str, tuple[list[int], int]]:
    """name -> (dims, bytes) of every initializer, external or inline."""
    graph = onnx.load(bundle / "model.onnx", load_external_data=False).graph
    sizes = {}
    for t in graph.initializer:
        length = next((int(e.value) for e in t.external_data if e.key == "length"), len(t.raw_data))
        sizes[t.name] = (list(t.dims), length)
    return sizes


def test_a_tied_embedding_is_stored_once(tiny_hf, tmp_path):
    """The bundle's weights are within 1.25x the GGUF's tensor bytes: Q4_0 as int4 block 32 with
    float32 scales is 20/18 of its blocks, Q8_0 as int8 36/34, norms and 64 positions of rotary
    tables come on top. A second copy of the embedding's codes and scales made it 1.5x."""
    path = write_tiny_gguf(tiny_hf("llama", **SHAPE), tmp_path / "m.gguf", QTYPES)
    gguf_bytes = sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
    bundle = tmp_path / "b"
    export_model(path, bundle, evaluate=False, max_context=64)
    sizes = _initializers(bundle)
    stored = sum(length for _, length in sizes.values())
    assert stored <= 1.25 * gguf_bytes, (stored, gguf_bytes)
    assert not any(name.startswith("model.embed_tokens") for name in sizes), sorted(sizes)
    # The one table answers both ends: the embedding gathers rows of lm_head's codes and scales.
    model = edgellm.load(bundle)
    assert model.generate([5, 17, 33], max_new_tokens=4, temperature=0).usage.completion_tokens == 4


def _resident(root: Path) -> int:
    """Bytes of this process's mappings of files under `root` that are resident."""
    prefix, total, inside = str(root.resolve()) + "/", 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0]:
            inside = len(fields) >= 6 and fields[5].startswith(prefix)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux: reads /proc/self/smaps")
def test_loaded_weights_are_resident_once(tiny_hf, tmp_path):
    """onnxruntime keeps the tied table (and, on x86, every MatMulNBits' scales) mapped after
    prepacking copies them; load drops those pages, so only the prepacked copy stays."""
    path = write_tiny_gguf(tiny_hf("llama", **SHAPE), tmp_path / "m.gguf", QTYPES)
    bundle = tmp_path / "b"
    export_model(path, bundle, evaluate=False, max_context=64)
    model = edgellm.load(bundle)
    assert _resident(bundle) == 0
    model.generate([5, 17, 33], max_new_tokens=4, temperature=0)  # gathered rows come back as read


def test_rotary_tables_hold_the_bundles_context(tiny_hf, tmp_path):
    """A 32k-position model exports 8,192 positions by default (the largest profile's context) and
    says so; --max-context picks fewer; edgellm.load caps its context there."""
    folder = tiny_hf("llama", max_position_embeddings=32768)
    rows = lambda bundle: {name: dims for name, (dims, _) in _initializers(bundle).items() if "_cache" in name}
    manifest = export_model(folder, tmp_path / "default", quant=QuantConfig("fp32"), evaluate=False)
    assert manifest.spec.max_context == 8192
    assert {name: dims[0] for name, dims in rows(tmp_path / "default").items()} == {"cos_cache": 8192,
                                                                                 "sin_cache": 8192}
    assert any(n.startswith("context: 8192 positions (the model's max_position_embeddings 32768")
               for n in manifest.quantization["notes"])
    assert edgellm.load(tmp_path / "default", max_context=20000, verify=False).max_context == 8192

    manifest = export_model(folder, tmp_path / "short", quant=QuantConfig("fp32"), evaluate=False, max_context=100)
    assert manifest.spec.max_context == 100
    assert {dims[0] for dims in rows(tmp_path / "short").values()} == {100}
    model = edgellm.load(tmp_path / "short", max_context=4096, verify=False)
    assert model.max_context == 100
    ids = model.generate([5, 17, 33], max_new_tokens=3, temperature=0).token_ids
    full = edgellm.load(tmp_path / "default", verify=False).generate([5, 17, 33], max_new_tokens=3, temperature=0)
    assert ids == full.token_ids  # the same positions, the same rotation

    with pytest.raises(ExportError, match="^--max-context 40000: expected 2 to the model's max_position_embeddings"):
        export_model(folder, tmp_path / "long", quant=QuantConfig("fp32"), evaluate=False, max_context=40000)
    assert not (tmp_path / "long").exists()


def test_the_rotary_rows_are_the_first_positions(tiny_hf, tmp_path):
    """Shorter tables are the longer ones' first rows, not a rescaled rotation."""
    folder = tiny_hf("llama", max_position_embeddings=32768)
    for name, context in (("a", 64), ("b", 8192)):
        export_model(folder, tmp_path / name, quant=QuantConfig("fp32"), evaluate=False, max_context=context)
    tables = [onnx.load(tmp_path / name / "model.onnx").graph.initializer for name in "ab"]
    cos = [next(onnx.numpy_helper.to_array(t) for t in init if t.name == "cos_cache") for init in tables]
    np.testing.assert_array_equal(cos[0], cos[1][:64])


def test_a_four_bit_head_halves_the_tied_table(tiny_hf, tmp_path):
    """--head-bits 4: the Q8_0 tied table (lm_head and the embedding's gather) is rounded afresh to
    int4 block 32, so its codes take half the bytes; the notes and the manifest say so."""
    path = write_tiny_gguf(tiny_hf("llama", **SHAPE), tmp_path / "m.gguf", QTYPES)
    exact, small = tmp_path / "exact", tmp_path / "head4"
    export_model(path, exact, evaluate=False, max_context=64)
    manifest = export_model(path, small, evaluate=False, max_context=64, quant=QuantConfig(head_bits=4))
    before, after = _initializers(exact)["lm_head.qweight"], _initializers(small)["lm_head.qweight"]
    assert after[1] * 2 == before[1], (before, after)
    assert manifest.quantization["head_bits"] == 4
    assert "re-quantized 1 Q8_0 tensor to int4 block 32 symmetric: 5.00 bits a weight read (8.50 in the GGUF)" in \
        manifest.quantization["notes"], manifest.quantization["notes"]
    # The embedding gathers the int4 rows: the bundle loads and answers (its quality is the gate's to judge).
    assert edgellm.load(small).generate([5, 17, 33], max_new_tokens=4, temperature=0).usage.completion_tokens == 4
    with pytest.raises(ExportError, match="--head-bits 4 --quant fp16"):
        QuantConfig(weights="fp16", head_bits=4)

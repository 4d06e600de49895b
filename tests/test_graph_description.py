"""The bundle's graph is described once (runtime/bundle.py `Graph`): checked when the manifest is
read, so a bad field is a one-line BundleError at load, not a failure on the first request;
the runner and the cache come from that description alone (runtime/runner.py `open_runner`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import edgellm
from edgellm.errors import BundleError, GenerationError
from edgellm.runtime.bundle import MANIFEST, Graph, read_manifest
from edgellm.runtime.caches import AppendCache, DynamicCache, FixedCache, StaticCache, cache_for
from edgellm.runtime.model_spec import ModelSpec
from edgellm.runtime.providers import create_session
from edgellm.runtime.runner import Runner, open_runner, open_slots
from test_bundle import edit_manifest

SPEC = ModelSpec(arch="llama", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
                 head_dim=8, vocab_size=100, max_context=64)


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.mark.parametrize("field, value, says", [
    ("kv_dtype", "bfloat16", "graph.kv_dtype 'bfloat16' is not one of"),
    ("inputs", "input_ids", "graph.inputs must be a list of names, got 'input_ids'"),
    ("outputs", ["logits", 3], "graph.outputs must be a list of names"),
])
def test_a_bad_graph_field_is_refused_when_the_manifest_is_read(bundle, field, value, says):
    # Before the description, a kv_dtype edgellm has no cache for passed read_manifest and load
    # failed later in the cache with a GenerationError; malformed names passed both.
    edit_manifest(bundle, lambda d: d["graph"].update({field: value}))
    with pytest.raises(BundleError, match=f"{MANIFEST}: {says}"):
        read_manifest(bundle, verify=False)
    with pytest.raises(BundleError, match=says):
        edgellm.load(bundle)


def test_an_embedding_graph_names_its_dimensions(bundle):
    edit_manifest(bundle, lambda d: d["graph"].update(kind="embedding", pooling="mean", dimensions=0))
    with pytest.raises(BundleError, match="graph.dimensions must be a positive integer, got 0"):
        read_manifest(bundle, verify=False)


def test_the_description_writes_back_the_section_it_read(bundle):
    written = json.loads((bundle / MANIFEST).read_text())["graph"]
    graph = read_manifest(bundle, verify=False).graph
    assert graph.to_dict() == written and Graph.from_dict(written) == graph
    with pytest.raises(AttributeError):  # frozen: nothing downstream edits what load checked
        graph.batch = False  # type: ignore[misc]


def test_a_manifest_without_the_later_fields_reads_as_the_first_exports_wrote_it():
    graph = Graph.from_dict({"kind": "fast", "file": "model.onnx", "inputs": [], "outputs": ["logits"]})
    assert (graph.target, graph.kv_dtype, graph.batch, graph.layout, graph.takes_slots) == \
        ("cpu", "float32", False, "static", True)


@pytest.mark.parametrize("section, cache, slots", [
    ({"kind": "generic"}, DynamicCache, False),
    ({"kind": "fast"}, StaticCache, True),
    ({"kind": "fast", "target": "cuda", "kv_dtype": "float16"}, StaticCache, True),
    ({"kind": "fast", "target": "openvino"}, AppendCache, False),
    ({"kind": "fast", "target": "qnn", "context": 16}, FixedCache, False),
])
def test_the_layout_alone_picks_the_cache(section, cache, slots):
    graph = Graph.from_dict({"file": "model.onnx", "inputs": [], "outputs": ["logits"], **section})
    made = cache_for(graph, SPEC, 16)
    assert type(made) is cache and made.dtype.name == graph.kv_dtype and graph.takes_slots is slots


def test_open_runner_and_open_slots_fit_the_tiny_bundle(tiny_bundle):
    manifest = read_manifest(tiny_bundle, verify=False)
    session = create_session(tiny_bundle / manifest.graph.file, threads=1)
    runner = open_runner(session, manifest.graph, manifest.spec, 32)
    assert type(runner) is Runner and isinstance(runner.cache, StaticCache) and runner.capacity == 32
    assert len(open_slots(session, manifest.graph, manifest.spec, 32, 3).slots) == 3
    openvino = Graph.from_dict({**manifest.graph.to_dict(), "target": "openvino"})
    with pytest.raises(GenerationError, match="a --target openvino graph decodes one request at a time"):
        open_slots(session, openvino, manifest.spec, 32, 2)


def test_a_manifest_that_misnames_the_graphs_inputs_is_refused_at_load(bundle):
    # Before, graph.inputs and graph.outputs were written and never compared with the graph.
    edit_manifest(bundle, lambda d: d["graph"].update(inputs=[n for n in d["graph"]["inputs"] if n != "attention_mask"]))
    with pytest.raises(BundleError, match="graph input 'attention_mask': the graph has it, manifest.json's "
                                          "graph.inputs do not"):
        edgellm.load(bundle)
    edit_manifest(bundle, lambda d: d["graph"].update(inputs=[*d["graph"]["inputs"], "attention_mask"],
                                                      outputs=["logits", "hidden_states"]))
    with pytest.raises(BundleError, match="graph output 'hidden_states': manifest.json lists it, the graph's "
                                          "graph.outputs do not"):
        edgellm.load(bundle)

"""Continuous batching over cache slots: Model.generate_many, the Scheduler and SlotCache.

Exact equality with one-at-a-time decoding holds on fp32 graphs, which compute a row the
same whether it is alone or one of several; int4 MatMulNBits rounds several rows
differently from one, so there greedy text can part at a near-tie.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

import edgellm
from edgellm.runtime.bundle import finalize_manifest, read_manifest
from edgellm.errors import BundleError, GenerationError
from edgellm.runtime.caches import SlotCache, common_prefix, pick_slot
from edgellm.runtime.runner import PREFILL_CHUNK, BatchRunner, Runner, piece, prefill

PROMPTS = [
    "The quick brown fox",
    "What is the capital of France? The capital of France is",
    "Edge",
    "Edge boards run small language models close to the sensors, and",
]
# Different budgets: sequences leave at different steps, so waiting prompts join mid-run
# and finished slots in the middle of the batch ride along as padding rows.
BUDGETS = [dict(max_new_tokens=n, ignore_eos=True) for n in (9, 17, 5, 12)]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return edgellm.load(tiny_bundle)


@pytest.fixture
def rows(monkeypatch) -> list[int]:
    """How many slots each batched step fed (so a test can tell batching happened)."""
    seen: list[int] = []
    step = BatchRunner.step

    def counted(self, feeds):
        seen.append(len(feeds))
        return step(self, feeds)

    monkeypatch.setattr(BatchRunner, "step", counted)
    return seen


def one_at_a_time(model, prompts, each, **params):
    model.reset()
    return [model.generate(p, **{**params, **extra}) for p, extra in zip(prompts, each)]


@pytest.mark.parametrize("slots", [2, 3, 4])
def test_batched_greedy_equals_one_at_a_time(model, rows, slots):
    expected = one_at_a_time(model, PROMPTS, BUDGETS, temperature=0)
    got = model.generate_many(PROMPTS, slots=slots, each=BUDGETS, temperature=0)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.text for r in got] == [r.text for r in expected]
    assert [r.finish_reason for r in got] == ["length"] * 4
    assert max(rows) == slots  # several slots really shared steps
    assert sum(len(r.token_ids) for r in got) == sum(b["max_new_tokens"] for b in BUDGETS)


def test_seeded_sampling_equals_one_at_a_time(model):
    each = [dict(b, seed=10 + i) for i, b in enumerate(BUDGETS)]
    expected = one_at_a_time(model, PROMPTS, each, temperature=0.9, top_p=0.95)
    got = model.generate_many(PROMPTS, slots=4, each=each, temperature=0.9, top_p=0.95)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


def test_a_cancelled_sequence_leaves_the_others_alone(model, rows):
    expected = one_at_a_time(model, PROMPTS, BUDGETS, temperature=0)
    asked = 0

    def cancel() -> bool:
        nonlocal asked
        asked += 1
        return asked > 4  # after its 4th token

    each = [dict(b, cancel=cancel) if i == 1 else b for i, b in enumerate(BUDGETS)]
    got = model.generate_many(PROMPTS, slots=4, each=each, temperature=0)
    assert got[1].finish_reason == "cancelled"
    assert got[1].token_ids == expected[1].token_ids[:4]
    assert [r.token_ids for i, r in enumerate(got) if i != 1] == [r.token_ids for i, r in enumerate(expected) if i != 1]
    assert max(rows) == 4


def test_a_returning_prompt_reuses_its_slot(model, tiny_bundle):
    # The middle prompt ends first and rides along as a padding row while the others
    # decode; its cached rows must survive that for the follow-up to reuse them.
    budgets = [dict(max_new_tokens=n, ignore_eos=True) for n in (12, 3, 12)]
    prompts = [model.encode(p) for p in PROMPTS[1:4]]
    first = model.generate_many(prompts, slots=3, each=budgets, temperature=0)
    follow = [prompts[1] + first[1].token_ids + model.encode(" and then", add_special_tokens=False),
              prompts[0] + model.encode(" Paris", add_special_tokens=False)]
    got = model.generate_many(follow, slots=3, max_new_tokens=6, ignore_eos=True, temperature=0)
    fresh = edgellm.load(tiny_bundle)
    expected = [fresh.generate(p, max_new_tokens=6, ignore_eos=True, temperature=0) for p in follow]
    # Every cached id of the prompt's slot is reused: its prompt and the answer but the last token.
    assert [r.usage.cached_prompt_tokens for r in got] == [len(prompts[1]) + 2, len(prompts[0])]
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


def test_a_prefix_another_slot_holds_is_copied_not_recomputed(model, tiny_bundle):
    shared = model.encode("You are a maintenance assistant. Quote the sensor data exactly.")
    prompts = [shared + model.encode(q, add_special_tokens=False) for q in (" Pump 3?", " Fan?", " Motor 12?")]
    model.reset()
    got = model.generate_many(prompts, slots=3, max_new_tokens=8, ignore_eos=True, temperature=0)
    # The first prompt fills its slot; the others copy its rows of the prefix they share.
    common = [common_prefix(prompts[0], p, len(p)) for p in prompts[1:]]
    assert min(common) >= len(shared)
    assert [r.usage.cached_prompt_tokens for r in got] == [0, *common]
    fresh = edgellm.load(tiny_bundle)
    expected = []
    for p in prompts:
        fresh.reset()
        expected.append(fresh.generate(p, max_new_tokens=8, ignore_eos=True, temperature=0))
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


def test_a_long_prompt_joins_a_chunk_per_step_while_the_others_decode(model, tiny_bundle, monkeypatch):
    long = model.encode("Sensor log: " + " ".join(f"pump {i} reads {i * 7 % 90} bar;" for i in range(12)))
    assert len(long) > 3 * PREFILL_CHUNK
    short = model.encode(PROMPTS[1])
    events: list[tuple[str, int]] = []
    forward, step = Runner.forward, BatchRunner.step
    monkeypatch.setattr(Runner, "forward", lambda self, ids: events.append(("prefill", len(ids))) or forward(self, ids))
    monkeypatch.setattr(BatchRunner, "step", lambda self, feeds: events.append(("decode", len(feeds))) or step(self, feeds))
    model.reset()
    got = model.generate_many([short, long], slots=2, each=[dict(max_new_tokens=40), dict(max_new_tokens=4)],
                              ignore_eos=True, temperature=0)
    pieces = [n for kind, n in events if kind == "prefill"][1:]  # the short prompt's first
    assert sum(pieces) == len(long) and max(pieces) <= PREFILL_CHUNK and min(pieces) >= 2
    # Between two pieces of the long prompt the short one took a decoding step.
    kinds = [kind for kind, _ in events]
    first, last = kinds.index("prefill", 1), len(kinds) - 1 - kinds[::-1].index("prefill")
    assert kinds[first:last + 1] == ["prefill", "decode"] * (len(pieces) - 1) + ["prefill"]
    fresh = edgellm.load(tiny_bundle)
    expected = [fresh.generate(p, max_new_tokens=n, ignore_eos=True, temperature=0) for p, n in ((short, 40), (long, 4))]
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


@pytest.mark.parametrize("pending,budget,expected", [
    (100, 64, 64), (65, 64, 63), (3, 2, 3), (2, 1, 2), (1, 64, 1), (10, 64, 10), (67, 5, 5), (6, 5, 4)])
def test_a_prefill_piece_keeps_within_the_budget_and_never_leaves_one_token(pending, budget, expected):
    assert piece(list(range(pending)), budget) == expected


@pytest.mark.parametrize("length,runs", [(1, [1]), (2, [2]), (64, [64]), (65, [63, 2]), (128, [64, 64]),
                                         (129, [64, 63, 2]), (200, [64, 64, 64, 8])])
def test_a_single_request_prefills_in_chunks_never_ending_on_one_token(length, runs):
    fed: list[int] = []
    prefill(lambda ids: fed.append(len(ids)) or ids[-1], list(range(length)))
    assert fed == runs


def test_pick_slot_prefers_the_longest_prefix_then_the_least_recently_used():
    cached = [[1, 2, 3, 4], [1, 2], [], [9, 9]]
    assert pick_slot(cached, [1, 2, 3, 4, 7], [3, 2, 1, 0]) == 0
    assert pick_slot(cached, [1, 2, 8, 8], [1, 0]) == 1  # equal prefixes: the first candidate
    assert pick_slot(cached, [5, 6], [3, 2]) == 3  # nothing shared: least recently used
    # Two ids are left to feed (kvcache.reusable_prefix): [9, 9] itself shares nothing reusable,
    assert pick_slot(cached, [9, 9], [2, 3]) == 2
    # [9, 9, 9] one row.
    assert pick_slot(cached, [9, 9, 9], [2, 3]) == 3
    with pytest.raises(GenerationError, match="no free cache slot"):
        pick_slot(cached, [1], [])


def test_a_slot_is_a_view_of_the_shared_buffers():
    cache = SlotCache(3, num_layers=2, kv_heads=2, head_dim=4, capacity=8)
    cache.slots[1].keys[0][0, 1, 5] = 7.0
    assert cache.keys[0][1, 1, 5].tolist() == [7.0] * 4
    assert not cache.keys[0][[0, 2]].any()
    with pytest.raises(GenerationError, match="slots must be an integer >= 1, got 0"):
        SlotCache(0, 2, 2, 4, 8)


@pytest.fixture(scope="module")
def batch1_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle as exported before graphs had a batch dimension."""
    root = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("batch1") / "bundle"))
    graph = onnx.load(root / "model.onnx", load_external_data=False)
    for value in [*graph.graph.input, *graph.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.name != "logits_to_keep":
            dims[0].Clear()
            dims[0].dim_value = 1
    onnx.save_model(graph, root / "model.onnx")
    finalize_manifest(root, read_manifest(root, verify=False))
    data = json.loads((root / "manifest.json").read_text())
    del data["graph"]["batch"]
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def test_a_batch1_bundle_still_loads_and_generates_one_slot_at_a_time(batch1_bundle, model, rows):
    old = edgellm.load(batch1_bundle)
    assert old.manifest.graph.batch is False
    expected = one_at_a_time(model, PROMPTS, BUDGETS, temperature=0)
    assert old.generate(PROMPTS[1], temperature=0, **BUDGETS[1]).token_ids == expected[1].token_ids
    got = old.generate_many(PROMPTS, slots=4, each=BUDGETS, temperature=0)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert not rows and len(old.scheduler(4).runner.slots) == 1  # one slot, the model's own cache: no batched step
    cache = SlotCache(2, old.spec.num_layers, old.spec.num_kv_heads, old.spec.head_dim, 16)
    with pytest.raises(BundleError, match="'input_ids' has batch dimension 1; 2 slots need a graph exported"):
        BatchRunner(old._runner.session, cache)


def test_generate_many_checks_its_arguments(model):
    with pytest.raises(GenerationError, match="each has 1 parameter sets for 2 prompts"):
        model.generate_many(["a", "b"], each=[{}])
    with pytest.raises(GenerationError, match="slots must be an integer >= 1, got 0"):
        model.generate_many(["a"], slots=0)
    with pytest.raises(GenerationError, match="temperature"):
        model.generate_many(["a"], temperature=-1)


def test_the_manifest_batch_field_must_be_a_bool(tiny_bundle, tmp_path):
    root = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    data = json.loads((root / "manifest.json").read_text())
    assert data["graph"]["batch"] is True
    data["graph"]["batch"] = "yes"
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="graph.batch must be true or false, got 'yes'"):
        read_manifest(root, verify=False)
    data["graph"].update(batch=True, target="tpu")
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="graph.target 'tpu' is not one of"):
        read_manifest(root, verify=False)


def test_a_generic_graph_runs_the_prompts_one_after_another(tiny_bundle_factory):
    pytest.importorskip("optimum.exporters.onnx")
    generic = edgellm.load(tiny_bundle_factory("llama", "fp32", "optimum"))
    expected = [generic.generate(p, temperature=0, **b) for p, b in zip(PROMPTS, BUDGETS)]
    got = generic.generate_many(PROMPTS, each=BUDGETS, temperature=0)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]

"""edgellm.load and Model on tiny exported bundles: tokens, prefix reuse, stops, limits, errors."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import onnxruntime as ort
import pytest

import edgellm
from edgellm.errors import BundleError, GenerationError

PROMPTS = [
    "The quick brown fox",
    "The quick brown fox jumps over",  # extends the first
    "The quick brown dog",  # shares a prefix, then diverges
    "What is the capital of France?",  # shares nothing
    "The quick brown fox",  # a full match: rewinds by one
]
GREEDY = dict(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def fp32(tiny_bundle) -> edgellm.Model:
    return edgellm.load(tiny_bundle)


@pytest.fixture(scope="module")
def int4(tiny_bundle_factory) -> edgellm.Model:
    return edgellm.load(tiny_bundle_factory("llama", "int4", "fast"))


def _cold(model: edgellm.Model, prompt, **params) -> edgellm.Result:
    model.reset()
    return model.generate(prompt, **params)


def test_greedy_matches_transformers(fp32, tiny_hf):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf("llama")).eval()
    for prompt in PROMPTS[:4]:
        ids = fp32.encode(prompt)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=0)
        result = _cold(fp32, prompt, **GREEDY)
        assert result.token_ids == out[0, len(ids):].tolist(), prompt
        assert result.finish_reason == "length"


def test_chunked_prefill_matches_transformers(fp32, tiny_hf):
    """A prompt over two prefill chunks (not a whole number of them) still gives the source's tokens."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from edgellm.runtime.runner import PREFILL_CHUNK

    ids = []
    while len(ids) < 2 * PREFILL_CHUNK + 37:
        ids += fp32.encode(" ".join(PROMPTS) + f" {len(ids)}")
    ids = ids[: 2 * PREFILL_CHUNK + 37]
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf("llama")).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    result = _cold(fp32, ids, max_new_tokens=8, ignore_eos=True)
    assert result.usage.prompt_tokens == len(ids) > 2 * PREFILL_CHUNK
    assert result.token_ids == out[0, len(ids):].tolist()


@pytest.mark.parametrize("which", ["fp32", "int4"])
def test_prefix_reuse_gives_cold_tokens(which, request):
    model = request.getfixturevalue(which)
    cold = [_cold(model, p, **GREEDY) for p in PROMPTS]
    model.reset()
    warm = [model.generate(p, **GREEDY) for p in PROMPTS]
    assert [r.token_ids for r in warm] == [r.token_ids for r in cold]
    ids = [model.encode(p) for p in PROMPTS]
    # What each request found in the cache: the previous prompt plus its answer (less the last token).
    previous = [[]] + [ids[i] + cold[i].token_ids[:-1] for i in range(len(PROMPTS) - 1)]
    for prompt_ids, cached_ids, result in zip(ids, previous, warm):
        common = 0
        while common < min(len(prompt_ids) - 1, len(cached_ids)) and prompt_ids[common] == cached_ids[common]:
            common += 1
        assert result.usage.cached_prompt_tokens == common
        assert result.usage.prompt_tokens == len(prompt_ids)
    assert warm[1].usage.cached_prompt_tokens == len(ids[0])
    assert warm[3].usage.cached_prompt_tokens == 0


def test_fast_and_generic_graphs_agree(fp32, tiny_bundle_factory):
    pytest.importorskip("optimum.exporters.onnx")
    generic = edgellm.load(tiny_bundle_factory("llama", "fp32", "optimum"))
    assert generic.manifest.graph.kind == "generic"
    for prompt in PROMPTS:  # warm on both: exercises DynamicCache's rewind too
        assert generic.generate(prompt, **GREEDY).token_ids == fp32.generate(prompt, **GREEDY).token_ids


def test_seeded_sampling_reproduces(fp32):
    params = dict(max_new_tokens=16, ignore_eos=True, temperature=1.0, top_p=0.95, top_k=50)
    a = _cold(fp32, PROMPTS[0], seed=7, **params)
    b = fp32.generate(PROMPTS[0], seed=7, **params)  # warm cache, same seed
    c = fp32.generate(PROMPTS[0], seed=8, **params)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stream_deltas_concatenate_to_result(fp32):
    params = dict(max_new_tokens=20, ignore_eos=True)
    chunks = list(fp32.stream(PROMPTS[3], **params))
    final = chunks[-1]
    assert final.finish_reason == "length" and final.usage.completion_tokens == 20
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    text = "".join(c.text for c in chunks)
    ids = [t for c in chunks for t in c.token_ids]
    result = fp32.generate(PROMPTS[3], **params)
    assert (text, ids) == (result.text, result.token_ids)
    assert text == fp32.tokenizer.decode(ids)


def _clean_boundary(model: edgellm.Model) -> tuple[str, edgellm.Result, str]:
    """A prompt, its greedy result, and a stop string whose first two characters end
    one generated token and whose last two begin the next."""
    for prompt in PROMPTS:
        result = _cold(model, prompt, max_new_tokens=24, ignore_eos=True)
        texts = [model.tokenizer.decode(result.token_ids[:i]) for i in range(len(result.token_ids) + 1)]
        for before, after in zip(texts[1:], texts[2:]):
            stop = before[-2:] + after[len(before) : len(before) + 2]
            if (len(before) >= 2 and len(after) >= len(before) + 2 and after.startswith(before)
                    and stop.isprintable() and "\ufffd" not in stop and result.text.find(stop) == len(before) - 2):
                return prompt, result, stop
    pytest.fail("no generated text with a clean token boundary to put a stop string on")


def test_stop_string_spanning_tokens_is_cut(fp32):
    prompt, full, stop = _clean_boundary(fp32)
    result = fp32.generate(prompt, max_new_tokens=24, ignore_eos=True, stop=[stop, "\x00never"])
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.find(stop)]
    assert stop not in "".join(c.text for c in fp32.stream(prompt, max_new_tokens=24, ignore_eos=True, stop=stop))


def test_stop_token_ids_end_generation(fp32):
    full = _cold(fp32, PROMPTS[0], **GREEDY)
    at = 4
    result = fp32.generate(PROMPTS[0], max_new_tokens=12, stop_token_ids=[full.token_ids[at]])
    first = full.token_ids.index(full.token_ids[at])
    assert result.finish_reason == "stop"
    assert result.token_ids == full.token_ids[:first]
    assert result.usage.completion_tokens == first + 1  # the stop token was sampled, not returned


def test_messages_render_through_chat_template(fp32):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = fp32.render_chat(messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert fp32.generate(messages, **GREEDY).token_ids == fp32.generate(rendered, **GREEDY).token_ids


def test_prompt_too_long_and_left_truncation(tiny_bundle):
    model = edgellm.load(tiny_bundle, max_context=16)
    assert model.max_context == 16
    long = "The quick brown fox jumps over the lazy dog. " * 4
    n = len(model.encode(long))
    with pytest.raises(GenerationError, match=f"prompt has {n} tokens, context is 16"):
        model.generate(long)
    result = model.generate(long, truncate="left", max_new_tokens=4, ignore_eos=True)
    assert result.usage.prompt_tokens == 12
    assert result.token_ids == _cold(model, model.tokenizer.decode(model.encode(long)[-12:]), max_new_tokens=4,
                                     ignore_eos=True).token_ids


def test_context_limit_finishes_with_length(tiny_bundle):
    model = edgellm.load(tiny_bundle, max_context=24)
    prompt_len = len(model.encode(PROMPTS[3]))
    result = model.generate(PROMPTS[3], max_new_tokens=100, ignore_eos=True)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 24 - prompt_len + 1
    assert result.token_ids == _cold(model, PROMPTS[3], max_new_tokens=24 - prompt_len + 1, ignore_eos=True).token_ids


@pytest.mark.parametrize("kind", ["event", "callable"])
def test_cancel_between_tokens(fp32, kind):
    event = threading.Event()
    calls = []
    cancel = event if kind == "event" else (lambda: calls.append(1) or len(calls) > 5)
    chunks = []
    for chunk in fp32.stream(PROMPTS[3], max_new_tokens=50, ignore_eos=True, cancel=cancel):
        chunks.append(chunk)
        if len(chunks) == 2:
            event.set()
    final = chunks[-1]
    assert final.finish_reason == "cancelled"
    assert 0 < final.usage.completion_tokens < 50
    already = fp32.generate(PROMPTS[3], cancel=lambda: True)
    assert (already.finish_reason, already.usage.completion_tokens, already.text) == ("cancelled", 0, "")


def test_abandoned_stream_cannot_resume(fp32):
    first = fp32.stream(PROMPTS[0], max_new_tokens=30, ignore_eos=True)
    next(first)
    fp32.generate(PROMPTS[3], **GREEDY)
    with pytest.raises(GenerationError, match="another generation started"):
        list(first)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(temprature=0.5), "unknown generation parameter 'temprature'"),
        (dict(temperature=-1), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(stop_token_ids=[10**6]), "stop_token_ids"),
        (dict(truncate="right"), "truncate"),
        (dict(cancel=3), "cancel"),
    ],
)
def test_bad_parameters_are_refused(fp32, params, message):
    with pytest.raises(GenerationError, match=message):
        fp32.stream(PROMPTS[0], **params)


def test_changed_byte_is_refused_naming_the_file(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    target = copy / "tokenizer.json"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="tokenizer.json: checksum mismatch"):
        edgellm.load(copy)


def test_unavailable_provider_falls_back_to_cpu(tiny_bundle, caplog):
    missing = next(p for p in ort.get_all_providers() if p not in ort.get_available_providers())
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        model = edgellm.load(tiny_bundle, providers=[missing])
    assert model.providers == ["CPUExecutionProvider"]
    assert any(missing in r.getMessage() and "not available" in r.getMessage() for r in caplog.records)


def test_failing_provider_falls_back_to_cpu(tiny_bundle, caplog, monkeypatch):
    real = ort.InferenceSession

    def session(path, options=None, providers=None):
        if providers and providers[0] != "CPUExecutionProvider":
            raise RuntimeError("device lost\nsecond line")
        return real(path, options, providers=providers)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["FakeExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        model = edgellm.load(tiny_bundle, providers=[("FakeExecutionProvider", {"device_id": "0"})])
    assert model.providers == ["CPUExecutionProvider"]
    assert any("FakeExecutionProvider failed" in r.getMessage() and "device lost" in r.getMessage()
               for r in caplog.records)


def test_import_pulls_in_no_export_stack(tiny_bundle):
    code = (
        "import sys, edgellm\n"
        f"m = edgellm.load({str(tiny_bundle)!r})\n"
        "m.generate('The quick', max_new_tokens=2)\n"
        "print(sorted(n for n in ('torch', 'transformers', 'optimum', 'onnx') if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _with_defaults(bundle: Path, tmp_path: Path, defaults: dict) -> Path:
    from edgellm.runtime.bundle import finalize_manifest, read_manifest

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = read_manifest(copy)
    manifest.generation = {**manifest.generation, "defaults": defaults}
    finalize_manifest(copy, manifest)
    return copy


def test_manifest_defaults_apply_unless_overridden(fp32, tiny_bundle, tmp_path):
    model = edgellm.load(_with_defaults(tiny_bundle, tmp_path, {"temperature": 1.0, "top_k": 5}))
    sampled = model.generate(PROMPTS[0], seed=3, **GREEDY)
    assert sampled.token_ids == _cold(fp32, PROMPTS[0], seed=3, temperature=1.0, top_k=5, **GREEDY).token_ids
    assert sampled.token_ids != _cold(fp32, PROMPTS[0], **GREEDY).token_ids
    greedy = model.generate(PROMPTS[0], temperature=0.0, **GREEDY)
    assert greedy.token_ids == fp32.generate(PROMPTS[0], **GREEDY).token_ids


def test_bad_manifest_defaults_are_refused(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="generation.defaults: top_p"):
        edgellm.load(_with_defaults(tiny_bundle, tmp_path, {"top_p": 3.0}))


def test_profile_sets_context_and_warns_on_memory(tiny_bundle, caplog):
    from edgellm.runtime.devices import DeviceProfile

    tiny = DeviceProfile(name="tiny", description="test board", threads=1,
                         providers=(("CPUExecutionProvider", {}),), max_context=32, memory_limit_mb=0,
                         recommended_quant="int4")
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        assert edgellm.load(tiny_bundle, profile=tiny).max_context == 32
    assert any("profile 'tiny'" in r.getMessage() for r in caplog.records)
    assert edgellm.load(tiny_bundle, profile=tiny, max_context=20).max_context == 20
    assert edgellm.load(tiny_bundle, max_context=10**6).max_context == 512  # the model's own limit
    assert edgellm.load(tiny_bundle, profile="generic").providers[-1] == "CPUExecutionProvider"


def test_slots_are_counted_in_the_memory_warning(tiny_bundle, caplog):
    from edgellm.runtime.devices import DeviceProfile, estimate_memory_mb

    model = edgellm.load(tiny_bundle)
    weights = (tiny_bundle / "model.onnx.data").stat().st_size + (tiny_bundle / "model.onnx").stat().st_size
    one = estimate_memory_mb(model.spec, model.max_context, weights)
    # Room for the weights and one cache, not for four.
    board = DeviceProfile(name="board", description="test board", threads=1, providers=(("CPUExecutionProvider", {}),),
                          max_context=512, memory_limit_mb=int(one) + 1, recommended_quant="fp32")
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        model = edgellm.load(tiny_bundle, profile=board)
        assert not caplog.records
        model.scheduler(4)
    assert [r.getMessage() for r in caplog.records if "4 KV cache slots of 512 tokens" in r.getMessage()]


def test_token_id_prompts_match_text_prompts(fp32):
    text = fp32.generate("The quick brown", max_new_tokens=8)
    ids = fp32.generate(fp32.encode("The quick brown"), max_new_tokens=8)
    assert ids.token_ids == text.token_ids and ids.text == text.text
    with pytest.raises(GenerationError, match="token id 99999 is out of range"):
        fp32.generate([1, 99999], max_new_tokens=1)
    with pytest.raises(GenerationError, match="token id -1 is out of range"):
        fp32.generate([-1], max_new_tokens=1)


def test_a_failed_onnxruntime_run_is_one_generation_error_naming_the_graph(tiny_bundle):
    runner = edgellm.load(tiny_bundle)._runner  # the Model checks ids; the runner trusts them
    with pytest.raises(GenerationError, match=r"model\.onnx: onnxruntime run failed \(") as err:
        runner.forward([99999])
    assert "\n" not in str(err.value)

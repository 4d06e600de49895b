"""Prompt-lookup speculation: drafts verified in one step give the very tokens plain decoding
gives, on fp32 graphs where one row and several rows compute alike."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import edgellm
from edgellm.engine import Engine, Job, Outcome
from edgellm.errors import BundleError, GenerationError
from edgellm.speculate import PromptLookup

QUOTE = ("Sensor report: machine press-7, sensor spindle-vibration, value 9.4 mm/s, baseline 2.1 mm/s. "
         "Machine press-7 spindle-vibration 9.4 mm/s against 2.1 mm/s baseline. The report again: ")
PROMPTS = [QUOTE, "The quick brown fox", [{"role": "user", "content": "Copy this line: " + QUOTE}]]


def test_a_draft_is_what_followed_the_latest_earlier_occurrence():
    lookup = PromptLookup()
    tokens = np.array([5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 4, 1, 5, 6, 7])
    assert lookup.draft(tokens, room=10) == [2, 3, 4]  # the latest earlier "5 6 7", three tokens to start
    assert lookup.draft(tokens, room=2) == [2, 3]
    assert lookup.draft(tokens, room=0) == []
    assert lookup.draft(np.array([1, 2, 3, 4]), room=5) == []  # nothing recurs
    assert lookup.draft(np.array([1, 9, 4, 1, 9]), room=5) == []  # two tokens are too little evidence
    lookup.update(3, 3)
    assert lookup.length == 5
    lookup.update(5, 1)
    assert (lookup.length, lookup.drafted, lookup.accepted) == (4, 8, 4)
    for _ in range(4):  # rejections wear the draft down to nothing, and the drafter rests
        lookup.update(1, 0)
    assert lookup.length == 0
    assert [lookup.draft(tokens, room=10) for _ in range(16)] == [[]] * 15 + [[2]]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return edgellm.load(tiny_bundle)


def both(model, prompt, **params):
    model.reset()
    plain = model.generate(prompt, **params)
    model.reset()
    fast = model.generate(prompt, speculative="prompt_lookup", **params)
    return plain, fast


@pytest.mark.parametrize("prompt", PROMPTS, ids=["quoting", "free", "chat"])
def test_greedy_and_seeded_sampling_give_the_same_tokens(model, prompt):
    for params in ({}, {"temperature": 0.9, "top_p": 0.95, "seed": 4}, {"repetition_penalty": 1.2}):
        plain, fast = both(model, prompt, max_new_tokens=48, **params)
        assert fast.token_ids == plain.token_ids and fast.text == plain.text, params
        assert fast.finish_reason == plain.finish_reason
        assert fast.usage.completion_tokens == plain.usage.completion_tokens
        assert fast.usage.accepted_draft_tokens <= fast.usage.draft_tokens


def test_drafts_are_taken_and_the_cache_keeps_only_what_was_written(model):
    # A random model repeats itself soon, so its own text gives drafts to accept.
    model.reset()
    result = model.generate(QUOTE, max_new_tokens=120, speculative="prompt_lookup")
    assert result.usage.accepted_draft_tokens > 0, result.usage
    prompt = model.encode(QUOTE)
    fed = prompt + result.token_ids[:-1]  # the last token is sampled, never fed
    assert model.cached_tokens == fed[: len(model.cached_tokens)] and len(model.cached_tokens) == len(fed)
    # The next turn reuses that cache as it would after plain decoding.
    again = model.generate(QUOTE, max_new_tokens=8, speculative="prompt_lookup")
    assert again.usage.cached_prompt_tokens == len(prompt) - 2  # the last two are fed again: see Runner.reuse


def test_budget_stop_strings_and_grammars_hold(model):
    for budget in (1, 2, 7):
        plain, fast = both(model, QUOTE, max_new_tokens=budget)
        assert fast.token_ids == plain.token_ids and len(fast.token_ids) <= budget
    text = both(model, QUOTE, max_new_tokens=60)[0].text
    stop = text[20:23]
    plain, fast = both(model, QUOTE, max_new_tokens=60, stop=[stop])
    assert fast.text == plain.text == text[: text.index(stop)] and fast.finish_reason == "stop"
    pytest.importorskip("llguidance", reason="constrained decoding needs the grammar extra")
    for seed in range(3):
        plain, fast = both(model, QUOTE, max_new_tokens=120, response_format={"type": "json_object"},
                           temperature=1.0, seed=seed)
        assert fast.token_ids == plain.token_ids and fast.incomplete == plain.incomplete
        if not fast.incomplete:
            assert isinstance(json.loads(fast.text), dict)


@pytest.mark.slow
def test_smollm2_fp32_greedy_is_identical(smollm2_fp32_bundle):
    model = edgellm.load(smollm2_fp32_bundle)
    for prompt in PROMPTS:
        plain, fast = both(model, prompt, max_new_tokens=60)
        assert fast.token_ids == plain.token_ids, prompt
    assert fast.usage.accepted_draft_tokens > 0


# -- a draft model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def draft(tiny_bundle_factory):
    """Another, smaller random model over the same tokenizer."""
    return edgellm.load(tiny_bundle_factory("llama", seed=1, num_layers=1))


def with_draft(model, prompt, **params):
    model.reset()
    plain = model.generate(prompt, **params)
    model.reset()
    return plain, model.generate(prompt, speculative="draft_model", **params)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["quoting", "free", "chat"])
def test_a_draft_model_gives_the_target_model_tokens(tiny_bundle, draft, prompt):
    target = edgellm.load(tiny_bundle, draft=draft)
    for params in ({}, {"temperature": 0.9, "seed": 4}):
        plain, fast = with_draft(target, prompt, max_new_tokens=40, **params)
        assert fast.token_ids == plain.token_ids and fast.text == plain.text, params
        assert fast.usage.draft_tokens > 0


def test_a_model_drafting_for_itself_is_always_right(tiny_bundle):
    model = edgellm.load(tiny_bundle, draft=tiny_bundle)
    plain, fast = with_draft(model, QUOTE, max_new_tokens=40)
    assert fast.token_ids == plain.token_ids
    assert fast.usage.accepted_draft_tokens == fast.usage.draft_tokens > 20


def test_a_draft_must_share_the_tokenizer_and_be_loaded(tiny_bundle, tiny_bundle_factory, model):
    from tests.tiny import THINK_TOOL_TOKENS

    other = tiny_bundle_factory("llama", added_tokens=THINK_TOOL_TOKENS)
    with pytest.raises(BundleError, match="vocabulary differs"):
        edgellm.load(tiny_bundle, draft=other)
    with pytest.raises(GenerationError, match='speculative "draft_model" needs a draft model'):
        model.generate(QUOTE, speculative="draft_model")


def test_a_sequence_decoding_alone_among_slots_speculates(model):
    """In a batch, drafts are verified only while one sequence decodes (onnxruntime's attention
    takes several new tokens for a batch of one); the tokens stay plain decoding's."""
    each = [dict(max_new_tokens=120, speculative="prompt_lookup"), dict(max_new_tokens=6)]
    prompts = [QUOTE, "The quick brown fox"]
    model.reset()
    expected = [model.generate(p, **e, temperature=0) for p, e in zip(prompts, each)]
    together = model.generate_many(prompts, slots=2, each=each, temperature=0)
    assert [r.token_ids for r in together] == [r.token_ids for r in expected]
    # It drafted once the short one had left, as much as alone (minus the six steps it shared).
    usage = together[0].usage
    assert 0 < usage.accepted_draft_tokens <= usage.draft_tokens
    assert usage.accepted_draft_tokens >= expected[0].usage.accepted_draft_tokens - 6
    plain = model.generate_many(prompts, slots=2, each=[dict(e, speculative="off") for e in each], temperature=0)
    assert plain[0].usage.draft_tokens == 0 and plain[0].token_ids == together[0].token_ids


def test_a_draft_model_request_served_with_two_slots_speculates_when_alone(tiny_bundle):
    """The service's loop and generate_many ask the same drafter_for as a lone stream: a
    draft_model request decoding alone among two slots verifies the draft model's guesses
    (before, only prompt lookup was known there and it silently decoded plainly). The model
    drafts for itself, so every guess is accepted."""
    target = edgellm.load(tiny_bundle, draft=tiny_bundle)
    params = dict(max_new_tokens=40, temperature=0, speculative="draft_model")
    plain = target.generate(QUOTE, max_new_tokens=40, temperature=0)
    (many,) = target.generate_many([QUOTE], slots=2, **params)
    ended: list[Outcome] = []
    done = threading.Event()
    engine = Engine(target, slots=2).start()
    try:
        assert engine.slots == 2
        job = Job(QUOTE, engine.params(params), client="c", on_chunk=lambda chunk: None,
                  on_end=lambda outcome: (ended.append(outcome), done.set()))
        assert engine.submit(job) is None
        assert done.wait(60), "the job never ended"
    finally:
        engine.close()
    assert ended[0].error is None, ended[0].error
    served = ended[0].last.result
    for result in (many, served):
        assert result.token_ids == plain.token_ids
        assert result.usage.accepted_draft_tokens == result.usage.draft_tokens > 20, result.usage

"""Reasoning traces: marker detection, and the think block of a Sequence token by token: its
channels, modes, budget, and a grammar that holds only the answer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.errors import BundleError
from edgellm.params import GenerationParams
from edgellm.reasoning import Markers, detect_markers, template_extras
from edgellm.sequence import Conventions, Sequence
from edgellm.text import Tokenizer
from tests.tiny import CHAT_TEMPLATE, build_tokenizer

# Qwen3's template, reduced to the parts that concern reasoning.
QWEN3_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ '<|im_start|>assistant\n' }}",
    "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}")
# A DeepSeek-R1 distill's: the generation prompt opens the block.
R1_TEMPLATE = (
    "{% for m in messages %}{{ m.content.split('</think>')[-1] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|><think>\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    inner = build_tokenizer()
    inner.add_tokens(["<think>", "</think>"])
    return Tokenizer(inner, bos_token_id=None, eos_token_ids=[2])


@pytest.fixture(scope="module")
def markers(tokenizer) -> Markers:
    found = detect_markers(QWEN3_TEMPLATE, tokenizer.token_to_id)
    assert found is not None
    return found


def test_markers_come_from_template_and_vocabulary(tokenizer, markers):
    assert (markers.start, markers.end) == ("<think>", "</think>")
    assert markers.start_id == tokenizer.token_to_id("<think>") != markers.end_id
    assert tokenizer.encode("</think>") == [markers.end_id]
    assert detect_markers(R1_TEMPLATE, tokenizer.token_to_id) == markers
    assert detect_markers(CHAT_TEMPLATE, tokenizer.token_to_id) is None  # template never closes one
    assert detect_markers(None, tokenizer.token_to_id) is None
    assert detect_markers(QWEN3_TEMPLATE, build_tokenizer().token_to_id) is None  # not in the vocabulary


def test_configured_markers(tokenizer):
    found = detect_markers(CHAT_TEMPLATE, tokenizer.token_to_id, ["<|im_start|>", "<|im_end|>"])
    assert found == Markers("<|im_start|>", "<|im_end|>", 1, 2)
    with pytest.raises(BundleError, match=r"generation.reasoning_markers must be a \[start, end\] pair"):
        detect_markers(CHAT_TEMPLATE, tokenizer.token_to_id, ["<think>"])
    with pytest.raises(BundleError, match="'<reason>' is not one token of the vocabulary"):
        detect_markers(CHAT_TEMPLATE, tokenizer.token_to_id, ["<think>", "<reason>"])


def test_off_renders_without_thinking_where_the_template_can():
    assert template_extras("off", QWEN3_TEMPLATE) == {"enable_thinking": False}
    assert template_extras("off", R1_TEMPLATE) == {}
    assert template_extras("separate", QWEN3_TEMPLATE) == {}


def test_a_block_opened_by_the_prompt(markers):
    assert markers.opened_by("<|Assistant|><think>\n")
    assert not markers.opened_by("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not markers.opened_by("<|im_start|>assistant\n")


CASES = [
    # (reply, starts inside a block, reasoning, answer)
    ("<think>\nFirst, 2+2.\n</think>\n\nIt is 4.", False, "First, 2+2.", "It is 4."),
    ("<think>a < b</think>yes", False, "a < b", "yes"),
    ("Just the answer.\n", False, "", "Just the answer.\n"),
    ("Answer <think>x</think> more", False, "", "Answer <think>x</think> more"),  # only a block that opens
    ("<think>half a thought", False, "half a thought", ""),  # the budget ran out
    ("<think></think>", False, "", ""),
    ("<think>one\n\ntwo\n</think>\n\n</think> stays", False, "one\n\ntwo", "</think> stays"),
    ("Let me see.\n</think>\n\nFour.", True, "Let me see.", "Four."),
    ("</think>Four.", True, "", "Four."),
    ("no end marker", True, "no end marker", ""),
]
VOCAB = 330


def new(tokenizer: Tokenizer, markers: Markers, inside: bool = False, **params) -> Sequence:
    prompt = tokenizer.encode("<|Assistant|><think>\n" if inside else "Question?")
    built = GenerationParams.build({}, {"max_new_tokens": 100, **params}, VOCAB)
    return Sequence(prompt, built, tokenizer, capacity=200, conventions=Conventions(markers))


def replay(seq: Sequence, ids: list[int]) -> tuple[str, str, list]:
    """(reasoning, text, chunks) of a sequence fed `ids` as if it had sampled them."""
    chunks = [c for t in ids if seq.finish_reason is None and (c := seq.append(t)) is not None]
    chunks.append(seq.finish())
    return "".join(c.reasoning for c in chunks), "".join(c.text for c in chunks), chunks


@pytest.mark.parametrize("text, inside, reasoning, answer", CASES)
def test_the_block_goes_to_its_own_channel(tokenizer, markers, text, inside, reasoning, answer):
    ids = tokenizer.encode(text)
    got_r, got_t, chunks = replay(new(tokenizer, markers, inside), ids)
    assert (got_r, got_t) == (reasoning, answer)
    assert [t for c in chunks for t in c.token_ids] == ids
    block = ids if inside else ids[1:] if ids[0] == markers.start_id else []
    thought = block.index(markers.end_id) if markers.end_id in block else len(block)
    assert chunks[-1].usage.reasoning_tokens == thought


@pytest.mark.parametrize("text, inside, reasoning, answer", CASES)
def test_modes(tokenizer, markers, text, inside, reasoning, answer):
    ids = tokenizer.encode(text)
    for mode in ("hide", "off"):  # "off" also keeps blocks from opening: see the sampling test below
        assert replay(new(tokenizer, markers, inside, reasoning=mode), ids)[:2] == ("", answer)
    assert replay(new(tokenizer, markers, inside, reasoning="inline"), ids)[:2] == ("", text)


def test_a_marker_spelled_in_pieces_is_text(tokenizer, markers):
    """Only the marker token switches channels: text that merely spells one stays text."""
    ids = tokenizer.encode("<th") + tokenizer.encode("ink>not a thought")
    assert markers.start_id not in ids
    assert replay(new(tokenizer, markers), ids)[:2] == ("", "<think>not a thought")


def test_reasoning_streams_as_it_comes(tokenizer, markers):
    ids = tokenizer.encode("<think>The quick brown fox? </think>\n\nThe capital of France is Paris.")
    _, _, chunks = replay(new(tokenizer, markers), ids)
    assert sum(bool(c.reasoning) for c in chunks) > 1 and sum(bool(c.text) for c in chunks) > 1
    # Reasoning first, then the answer: never interleaved.
    last_thought = max(i for i, c in enumerate(chunks) if c.reasoning)
    assert not any(c.text for c in chunks[: last_thought + 1])


def flat_logits(favourite: int) -> np.ndarray:
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[favourite] = 10.0
    return logits


def test_the_budget_closes_the_block(tokenizer, markers):
    word = tokenizer.encode(" fox")[0]
    seq = new(tokenizer, markers, max_reasoning_tokens=3, max_new_tokens=8)
    picked = []
    while seq.finish_reason is None:
        picked.append(seq.sample(flat_logits(markers.start_id if not picked else word)))
        seq.append(picked[-1])
    assert picked == [markers.start_id, word, word, word, markers.end_id, word, word, word]
    last = seq.finish()
    assert last.usage.reasoning_tokens == 3 and last.finish_reason == "length"
    # A budget of 0 closes a block the prompt opened before anything is sampled.
    seq = new(tokenizer, markers, inside=True, max_reasoning_tokens=0)
    assert seq.sample(flat_logits(word)) == markers.end_id


def test_off_never_opens_a_block_and_closes_one_the_prompt_opened(tokenizer, markers):
    word = tokenizer.encode(" fox")[0]
    seq = new(tokenizer, markers, reasoning="off")
    assert seq.sample(flat_logits(markers.start_id)) != markers.start_id
    assert new(tokenizer, markers, inside=True, reasoning="off").sample(flat_logits(word)) == markers.end_id
    assert new(tokenizer, markers, reasoning="separate").sample(flat_logits(markers.start_id)) == markers.start_id


def test_a_grammar_holds_the_answer_not_the_reasoning(tokenizer, markers):
    pytest.importorskip("llguidance", reason="constrained decoding needs the grammar extra")
    seq = new(tokenizer, markers, response_format={"type": "json_object"}, max_reasoning_tokens=4,
              temperature=1.0, seed=3)
    word = tokenizer.encode(" fox")[0]
    # At the start the block may open although JSON cannot begin with "<think>" ...
    assert seq.sample(flat_logits(markers.start_id)) == markers.start_id
    seq.append(markers.start_id)
    # ... inside it nothing is held to JSON ...
    for _ in range(4):
        assert seq.sample(flat_logits(word)) == word
        seq.append(word)
    # ... and once it closes, the answer is.
    assert seq.sample(flat_logits(word)) == markers.end_id
    seq.append(markers.end_id)
    assert seq.sample(flat_logits(word)) != word
    rng = np.random.default_rng(0)
    while seq.finish_reason is None:
        seq.append(seq.sample(rng.standard_normal(VOCAB).astype(np.float32)))
    last = seq.finish()
    if not last.incomplete:
        assert isinstance(json.loads(tokenizer.decode(seq.tokens[len(seq.prompt) + 6:].tolist())), dict)

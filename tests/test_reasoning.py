"""Reasoning traces: marker detection, the streaming splitter and its modes, the budget."""
from __future__ import annotations

import random

import pytest

from edgellm.errors import BundleError
from edgellm.reasoning import (Markers, ReasoningSplitter, detect_markers, split_reasoning,
                               template_extras)
from edgellm.text import StreamDecoder, Tokenizer
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


def test_budget_forces_the_end_marker(markers):
    assert markers.force_end(9, 10) == []
    assert markers.force_end(10, 10) == markers.force_end(11, 10) == [markers.end_id]
    assert markers.force_end(10_000, None) == []


def test_a_block_opened_by_the_prompt(markers):
    assert markers.opened_by("<|Assistant|><think>\n")
    assert not markers.opened_by("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not markers.opened_by("<|im_start|>assistant\n")


CASES = [
    # (reply, starts inside a block, reasoning, answer)
    ("<think>\nFirst, 2+2.\n</think>\n\nIt is 4.", False, "First, 2+2.", "It is 4."),
    ("\n<think>a < b</think>yes", False, "a < b", "yes"),
    ("Just the answer.\n", False, "", "Just the answer.\n"),
    ("  Answer <think>x</think> more", False, "", "  Answer <think>x</think> more"),
    ("<think>half a thought", False, "half a thought", ""),  # the budget ran out
    ("<think>thinking </thin", False, "thinking </thin", ""),
    ("<thi", False, "", "<thi"),
    ("<think></think>", False, "", ""),
    ("<think>one\n\ntwo\n</think>\n\n</think> stays", False, "one\n\ntwo", "</think> stays"),
    ("Let me see.\n</think>\n\nFour.", True, "Let me see.", "Four."),
    ("</think>Four.", True, "", "Four."),
    ("no end marker", True, "no end marker", ""),
    ("", False, "", ""),
]


def feed_all(splitter, pieces):
    parts = [splitter.feed(p) for p in pieces] + [splitter.flush()]
    return "".join(r for r, _ in parts), "".join(t for _, t in parts), parts


def splits(text):
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, max(len(text), 1)), max(0, min(4, len(text) - 1))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("text, inside, reasoning, answer", CASES)
def test_split_wherever_the_deltas_break(markers, text, inside, reasoning, answer):
    assert split_reasoning(text, markers, inside=inside) == (reasoning, answer)
    for pieces in splits(text):
        got_r, got_t, _ = feed_all(ReasoningSplitter(markers, inside=inside), pieces)
        assert (got_r, got_t) == (reasoning, answer), pieces


@pytest.mark.parametrize("text, inside, reasoning, answer", CASES)
def test_modes(markers, text, inside, reasoning, answer):
    for pieces in [list(text), [text]]:
        assert feed_all(ReasoningSplitter(markers, "hide", inside=inside), pieces)[:2] == ("", answer)
        assert feed_all(ReasoningSplitter(markers, "off", inside=inside), pieces)[:2] == ("", answer)
        inline = feed_all(ReasoningSplitter(markers, "inline", inside=inside), pieces)[:2]
        assert inline == ("", ("<think>" if inside else "") + text)


def test_a_marker_split_across_deltas_is_held_back(markers):
    splitter = ReasoningSplitter(markers)
    assert splitter.feed("<thi") == ("", "") and not splitter.in_reasoning
    assert splitter.feed("nk>\nStep one") == ("Step one", "") and splitter.in_reasoning
    assert splitter.feed(". </th") == (".", "")  # trailing space: held, may end the block
    assert splitter.feed("ink>\n\n") == ("", "") and splitter.answering
    assert splitter.feed("Done") == ("", "Done")
    assert splitter.flush() == ("", "")


def test_text_that_cannot_open_a_block_is_released_at_once(markers):
    splitter = ReasoningSplitter(markers)
    assert splitter.feed("<b>") == ("", "<b>") and splitter.answering
    assert splitter.feed("<think>") == ("", "<think>")


def test_the_splitter_on_a_tiny_tokenizers_stream(tokenizer, markers):
    """Token by token through the real stream decoder, markers arriving as single tokens."""
    reply = "<think>\nThe quick brown fox? </think>\n\nThe capital of France is Paris."
    ids = tokenizer.encode(reply)
    assert markers.start_id in ids and markers.end_id in ids
    decoder, splitter = StreamDecoder(tokenizer), ReasoningSplitter(markers)
    channels = [splitter.feed(decoder.push(i)) for i in ids] + [splitter.feed(decoder.flush()),
                                                               splitter.flush()]
    assert "".join(r for r, _ in channels) == "The quick brown fox?"
    assert "".join(t for _, t in channels) == "The capital of France is Paris."
    assert split_reasoning(tokenizer.decode(ids), markers) == (
        "The quick brown fox?", "The capital of France is Paris.")

"""One request's decoding state without a model: logits in, token out, text out."""
from __future__ import annotations

import numpy as np
import pytest

from edgellm.params import GenerationParams
from edgellm.sequence import Sequence
from edgellm.text import Tokenizer
from tests.tiny import build_tokenizer

VOCAB = 320
EOS = 0  # <|endoftext|>


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(build_tokenizer(VOCAB), bos_token_id=1, eos_token_ids=[EOS], add_bos_token=False)


def new(tokenizer: Tokenizer, prompt: list[int], capacity: int = 64, **params) -> Sequence:
    return Sequence(prompt, GenerationParams.build({}, params, VOCAB), tokenizer, capacity=capacity)


def toy_logits(tokens: np.ndarray) -> np.ndarray:
    """A made-up model: the logits depend only on the history, so every run can be replayed."""
    rng = np.random.default_rng(int(tokens.sum()) * 31 + len(tokens))
    logits = rng.standard_normal(VOCAB).astype(np.float32)
    logits[EOS] = -1e9
    return logits


def drive(seq: Sequence) -> tuple[list, object]:
    chunks = []
    while seq.finish_reason is None and not seq.check_cancel():
        if (chunk := seq.append(seq.sample(toy_logits(seq.tokens)))) is not None:
            chunks.append(chunk)
    return chunks, seq.finish()


def ids_of(run: tuple[list, object]) -> list[int]:
    return [t for c in run[0] + [run[1]] for t in c.token_ids]


def test_a_sequence_turns_tokens_into_chunks_within_its_budget(tokenizer):
    prompt = tokenizer.encode("The quick brown")
    chunks, last = drive(new(tokenizer, prompt, max_new_tokens=10))
    ids = ids_of((chunks, last))
    assert last.finish_reason == "length" and last.usage.completion_tokens == len(ids) == 10
    assert "".join(c.text for c in chunks + [last]) == tokenizer.decode(ids)
    assert all(c.text for c in chunks) and last.usage.prompt_tokens == len(prompt)
    # The context, not max_new_tokens, bounds it: the k-th token needs prompt + k - 1 cached.
    assert new(tokenizer, prompt, capacity=len(prompt) + 3, max_new_tokens=10).budget == 4


def test_sequences_share_no_state_so_a_scheduler_can_interleave_them(tokenizer):
    """Stepping two seeded sequences in turn gives each the tokens it gets alone."""
    prompts = [tokenizer.encode("Hello"), tokenizer.encode("The quick brown")]
    settings = [dict(temperature=1.0, seed=1, max_new_tokens=12), dict(temperature=0.8, top_k=20, seed=2,
                                                                        max_new_tokens=9, repetition_penalty=1.3)]
    alone = [ids_of(drive(new(tokenizer, p, **s))) for p, s in zip(prompts, settings)]
    seqs = [new(tokenizer, p, **s) for p, s in zip(prompts, settings)]
    ids: list[list[int]] = [[], []]
    while any(s.finish_reason is None for s in seqs):
        for i, seq in enumerate(seqs):
            if seq.finish_reason is None and (chunk := seq.append(seq.sample(toy_logits(seq.tokens)))):
                ids[i] += chunk.token_ids
    for i, seq in enumerate(seqs):
        ids[i] += seq.finish().token_ids
        assert ids[i] == seq.tokens[len(prompts[i]):].tolist() == alone[i]
    assert [len(a) for a in alone] == [12, 9] and alone[0] != ids_of(drive(new(tokenizer, prompts[0], **{
        **settings[0], "seed": 3})))


def test_a_stateful_processor_constrains_what_is_sampled(tokenizer):
    """How a grammar state takes part: it masks every sample and is advanced by every kept token."""
    # Sampled, not greedy: greedy asks `allows` first and masks only when refused (test_structured).
    seq = new(tokenizer, tokenizer.encode("Hello"), max_new_tokens=7, stop_token_ids=[5], temperature=1.0, seed=0)
    script = tokenizer.encode(" the quick") + [5]

    class Script:
        def __init__(self) -> None:
            self.at, self.seen = 0, []

        def __call__(self, tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
            self.seen.append(len(tokens))
            out = np.full_like(logits, -np.inf)
            out[script[self.at]] = logits[script[self.at]]
            return out

        def advance(self, token: int) -> None:
            assert token == script[self.at]
            self.at += 1

        done, accepting = False, True

    state = Script()
    seq.grammar = state
    run = drive(seq)
    # The stop token ends the sequence without an advance: nothing follows it.
    assert ids_of(run) == script[:-1] and run[1].finish_reason == "stop" and state.at == len(script) - 1
    assert state.seen == [len(seq.prompt) + k for k in range(len(script))]


def test_stop_token_cancel_and_stop_string_end_a_sequence(tokenizer):
    prompt = tokenizer.encode("Hello")
    seq = new(tokenizer, prompt, max_new_tokens=8)
    assert seq.append(EOS) is None and seq.finish_reason == "stop"
    last = seq.finish()
    assert (last.text, last.token_ids, last.usage.completion_tokens) == ("", [], 1)

    seq = new(tokenizer, prompt, cancel=lambda: True)
    assert seq.check_cancel() and seq.finish().usage.completion_tokens == 0

    first = drive(new(tokenizer, prompt, max_new_tokens=8))
    text = "".join(c.text for c in first[0] + [first[1]])
    stop = text[3:5]
    cut = drive(new(tokenizer, prompt, max_new_tokens=8, stop=[stop]))
    assert cut[1].finish_reason == "stop"
    assert "".join(c.text for c in cut[0] + [cut[1]]) == text[: text.index(stop)]

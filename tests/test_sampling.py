"""Samplers and logits processors on small hand-computed distributions."""
from __future__ import annotations

import numpy as np
import pytest

from edgellm.errors import GenerationError
from edgellm.params import check_all
from edgellm.sampling import (
    make_logits_processors,
    make_sampler,
    sampling_distribution,
)


def logits_of(probs: list[float]) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def as_dict(ids: np.ndarray, probs: np.ndarray) -> dict[int, float]:
    return {int(i): float(p) for i, p in zip(ids, probs)}


def apply(processors, tokens, logits):
    for p in processors:
        logits = p(np.asarray(tokens), logits)
    return logits


# --- greedy -------------------------------------------------------------------------

def test_greedy_takes_argmax_and_breaks_ties_to_lowest_id():
    sample = make_sampler()
    assert sample(np.array([1.0, 3.0, 2.0], np.float32)) == 1
    assert sample(np.array([1.0, 3.0, 3.0, 0.0, 3.0], np.float32)) == 1


def test_temperature_zero_distribution_is_the_greedy_token():
    ids, probs = sampling_distribution(np.array([0.0, 5.0, 5.0], np.float32), temperature=0.0)
    assert as_dict(ids, probs) == {1: 1.0}


# --- filters ------------------------------------------------------------------------

def test_temperature_scales_the_distribution():
    logits = logits_of([1.0, 2.0, 4.0])
    ids, probs = sampling_distribution(logits, temperature=2.0)
    # p ** (1 / T), renormalized: [1, sqrt 2, 2] / (3 + sqrt 2)
    expected = np.array([1.0, np.sqrt(2.0), 2.0]) / (3.0 + np.sqrt(2.0))
    np.testing.assert_allclose(probs[np.argsort(ids)], expected, rtol=1e-6)
    ids, probs = sampling_distribution(logits, temperature=0.5)
    np.testing.assert_allclose(probs[np.argsort(ids)], np.array([1, 4, 16]) / 21, rtol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = logits_of([0.9, 0.0, 0.0, 0.1])
    assert as_dict(*sampling_distribution(logits, top_p=0.3)) == {0: 1.0}
    kept = as_dict(*sampling_distribution(logits_of([0.5, 0.2, 0.3]), top_p=0.7))
    assert kept.keys() == {0, 2}
    assert kept[0] == pytest.approx(0.625)
    # Mass reached exactly by the first token (powers of two are exact): it alone is kept.
    assert as_dict(*sampling_distribution(logits_of([0.5, 0.25, 0.25]), top_p=0.5)) == {0: 1.0}
    sample = make_sampler(temperature=1.0, top_p=0.3, seed=0)
    assert {sample(logits) for _ in range(200)} == {0}


def test_top_k_keeps_the_k_best():
    ids, probs = sampling_distribution(np.array([1.0, 3.0, 2.0, 0.0], np.float32), top_k=2)
    kept = as_dict(ids, probs)
    assert kept.keys() == {1, 2}
    assert kept[1] == pytest.approx(np.e / (np.e + 1))


def test_min_p_is_relative_to_the_best_token():
    kept = as_dict(*sampling_distribution(logits_of([0.5, 0.3, 0.09, 0.11]), min_p=0.2))
    assert kept.keys() == {0, 1, 3}
    assert kept[3] == pytest.approx(0.11 / 0.91)


def test_filters_compose_in_order_top_k_top_p_min_p():
    probs = [0.4, 0.3, 0.2, 0.06, 0.04]
    # top-k 3 renormalizes to [4/9, 3/9, 2/9]; top-p 0.7 then needs 0 and 1 (7/9).
    kept = as_dict(*sampling_distribution(logits_of(probs), top_k=3, top_p=0.7))
    assert kept.keys() == {0, 1}
    # top-p 0.95 keeps all three; min-p 0.6 of the best (0.4) then drops 2 (0.2 < 0.24).
    kept = as_dict(*sampling_distribution(logits_of(probs), top_k=3, top_p=0.95, min_p=0.6))
    assert kept.keys() == {0, 1}
    kept = as_dict(*sampling_distribution(logits_of(probs), top_p=0.95, min_p=0.8))
    assert kept.keys() == {0}


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    rng = np.random.default_rng(0)
    for scale in (0.1, 3.0):  # flat (widens past the first candidates) and peaked
        logits = (rng.standard_normal(150_000) * scale).astype(np.float32)
        ids, probs = sampling_distribution(logits, temperature=0.7, top_p=0.9)
        p = np.exp((logits / np.float32(0.7)).astype(np.float64) - logits.max() / 0.7)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        expected = order[before < 0.9]
        assert set(ids.tolist()) == set(expected.tolist())
        assert probs.sum() == pytest.approx(1.0)


def test_sampler_draws_in_proportion():
    sample = make_sampler(temperature=1.0, seed=3)
    logits = logits_of([0.1, 0.6, 0.3])
    counts = np.bincount([sample(logits) for _ in range(3000)], minlength=3) / 3000
    np.testing.assert_allclose(counts, [0.1, 0.6, 0.3], atol=0.03)


def test_all_minus_inf_logits_raise():
    logits = np.full(4, -np.inf, np.float32)
    with pytest.raises(GenerationError, match="every logit"):
        make_sampler(temperature=1.0)(logits)


# --- seeds --------------------------------------------------------------------------

def _run(seed: int, steps: int = 40) -> list[int]:
    sample = make_sampler(temperature=0.9, top_k=50, top_p=0.95, seed=seed)
    rng = np.random.default_rng(123)  # the same logits for every run
    return [sample(rng.standard_normal(1000).astype(np.float32)) for _ in range(steps)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    assert _run(7) == _run(7)
    assert _run(7) != _run(8)


# --- processors ---------------------------------------------------------------------

LOGITS = np.array([2.0, -2.0, 1.0, 0.5], np.float32)


def test_no_parameters_no_processors():
    assert make_logits_processors() == []


def test_repetition_penalty_divides_positive_multiplies_negative_once_per_token():
    out = apply(make_logits_processors(repetition_penalty=2.0), [0, 1, 1], LOGITS.copy())
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, 0.5])


def test_presence_penalty_subtracts_once_per_distinct_token():
    out = apply(make_logits_processors(presence_penalty=0.5), [0, 1, 1], LOGITS.copy())
    np.testing.assert_array_equal(out, [1.5, -2.5, 1.0, 0.5])


def test_frequency_penalty_subtracts_once_per_occurrence():
    out = apply(make_logits_processors(frequency_penalty=0.5), [0, 1, 1], LOGITS.copy())
    np.testing.assert_array_equal(out, [1.5, -3.0, 1.0, 0.5])


def test_penalties_only_look_at_the_window():
    procs = make_logits_processors(repetition_penalty=2.0, frequency_penalty=0.25, penalty_window=2)
    out = apply(procs, [0, 1, 2], LOGITS.copy())
    np.testing.assert_array_equal(out, [2.0, -4.25, 0.25, 0.5])


def test_logit_bias_adds_to_the_named_tokens_and_leaves_the_input_alone():
    logits = LOGITS.copy()
    out = apply(make_logits_processors(logit_bias={3: 5.0, 1: -1.5}), [0], logits)
    np.testing.assert_array_equal(out, [2.0, -3.5, 1.0, 5.5])
    np.testing.assert_array_equal(logits, LOGITS)


def test_penalties_with_no_tokens_change_nothing():
    out = apply(make_logits_processors(repetition_penalty=1.3), [], LOGITS.copy())
    np.testing.assert_array_equal(out, LOGITS)


def test_logit_bias_out_of_range():
    with pytest.raises(GenerationError, match="logit_bias key"):
        check_all({"logit_bias": {4: 1.0}}, vocab_size=4)
    procs = make_logits_processors(logit_bias={4: 1.0})
    with pytest.raises(GenerationError, match="logit_bias key 4"):
        apply(procs, [0], LOGITS.copy())


# --- validation ---------------------------------------------------------------------

@pytest.mark.parametrize("params, name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=1.0), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(seed=-1), "seed"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(penalty_window=0), "penalty_window"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(logit_bias={"5": 1.0}), "logit_bias key"),
    (dict(logit_bias={-1: 1.0}), "logit_bias key"),
    (dict(logit_bias={5: 101.0}), r"logit_bias\[5\]"),
])
def test_bad_parameters_are_named(params, name):
    """Checked where a request arrives (the factories trust what they are given)."""
    with pytest.raises(GenerationError, match=f"^{name} must be"):
        check_all(params)

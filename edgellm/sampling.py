"""Logits processors and samplers: pure numpy on one 1-D row of logits.

Processors are `(tokens, logits) -> logits`, where `tokens` is every token so far
(prompt and generated); samplers are `logits -> token id`. Both are built by small
factories from parameters checked already, where the request arrived (`edgellm.params`,
the one declaration of every range): they do not check them again.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import GenerationError

Processor = Callable[[np.ndarray, np.ndarray], np.ndarray]
Sampler = Callable[[np.ndarray], int]

# Top-p first looks at this many best candidates and ranks the whole row only when
# their mass falls short: a peaked distribution never pays for a full sort.
_TOP_P_FIRST = 256


def make_logits_processors(
    *,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
    penalty_window: int | None = None,
) -> list[Processor]:
    """The processors these parameters ask for, in the order to apply them.

    Only parameters that change something get a processor, so the default costs
    nothing per token. Repetition penalty follows Hugging Face (divide a positive
    logit, multiply a negative one, once per distinct token); presence and frequency
    penalties follow OpenAI (subtract once per distinct token, and once per
    occurrence). All three look at the last `penalty_window` tokens when it is given.
    """
    processors: list[Processor] = []
    if repetition_penalty != 1.0 or presence_penalty != 0.0 or frequency_penalty != 0.0:
        processors.append(_penalties(repetition_penalty, presence_penalty, frequency_penalty,
                                     penalty_window))
    if logit_bias:
        processors.append(_logit_bias(logit_bias))
    return processors


def _penalties(repetition: float, presence: float, frequency: float,
               window: int | None) -> Processor:
    def apply(tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        recent = np.asarray(tokens if window is None else tokens[-window:], dtype=np.int64)
        if recent.size == 0:
            return logits
        ids, counts = np.unique(recent, return_counts=True)
        out = logits.copy()
        picked = out[ids]
        if repetition != 1.0:
            picked = np.where(picked > 0, picked / repetition, picked * repetition)
        picked = picked - (presence + frequency * counts)
        out[ids] = picked
        return out

    return apply


def _logit_bias(bias: dict[int, float]) -> Processor:
    ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
    values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
    top = int(ids.max())

    def apply(tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if top >= logits.shape[-1]:
            raise GenerationError(f"logit_bias key {top} is out of range for a vocabulary of "
                                  f"{logits.shape[-1]}")
        out = logits.copy()
        out[ids] += values
        return out

    return apply


def make_sampler(
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """A function from one logits row to a token id.

    Temperature 0 is greedy: argmax, ties going to the lowest id. Otherwise the
    filters of `sampling_distribution` apply and a PCG64 generator seeded with `seed`
    draws, so one seed always gives the same tokens for the same logits.
    """
    if temperature == 0.0:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.Generator(np.random.PCG64(seed))

    def sample(logits: np.ndarray) -> int:
        ids, probs = sampling_distribution(logits, temperature=temperature, top_k=top_k,
                                           top_p=top_p, min_p=min_p)
        # One uniform draw against the cumulative mass: cheaper than rng.choice and
        # consumes exactly one number per token, which keeps seeded runs aligned.
        at = np.searchsorted(np.cumsum(probs), rng.random(), side="right")
        return int(ids[min(at, len(ids) - 1)])

    return sample


def sampling_distribution(
    logits: np.ndarray,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate ids and their probabilities (summing to 1) a sampler draws from.

    Filters compose in Hugging Face's order on the temperature-scaled distribution:
    top-k keeps the k most likely, top-p the smallest most-likely set whose mass
    (renormalized after top-k) reaches top_p, min-p those at least min_p times as
    likely as the best. Tokens exactly tied with the last one top-k or top-p keeps
    may be kept too. Public because speculative decoding needs the distribution the
    sampler uses; temperature 0 gives greedy's one certain token. Parameters are
    assumed checked.
    """
    if temperature == 0.0:
        return np.array([np.argmax(logits)]), np.ones(1)
    scaled = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    if 0 < top_k < scaled.shape[-1]:
        ids = np.argpartition(scaled, -top_k)[-top_k:]
        values = scaled[ids]
    else:
        ids, values = None, scaled
    best = values.max()
    if not np.isfinite(best):
        raise GenerationError("no token can be sampled: every logit is -inf or not a number")
    # float32 exp is several times faster than float64 on a 150k row; sums are
    # taken in float64, where rounding would otherwise shift the top-p cut.
    weights = np.exp(values - best)
    total = weights.sum(dtype=np.float64)
    # The best token has weight exp(0) = 1, so min-p is a plain threshold; it cuts a
    # tail of the same ranking top-p cuts, so applying it first changes nothing but
    # the work top-p has left.
    keep = np.flatnonzero(weights >= min_p) if min_p > 0 else None
    if keep is not None:
        weights = weights[keep]
        ids = keep if ids is None else ids[keep]
    if top_p < 1.0:
        keep = np.flatnonzero(weights >= _top_p_cut(weights, top_p * total))
        weights = weights[keep]
        ids = keep if ids is None else ids[keep]
    if ids is None:
        ids = np.arange(weights.shape[-1])
    weights = weights.astype(np.float64)
    return ids, weights / weights.sum()


def _top_p_cut(weights: np.ndarray, mass: float) -> float:
    """The smallest weight top-p keeps: ranking best first, the one that brings the
    running sum to `mass`."""
    n = weights.shape[-1]
    ranked = weights
    if n > _TOP_P_FIRST:
        best = np.partition(weights, n - _TOP_P_FIRST)[n - _TOP_P_FIRST:]
        # When the best few already reach the mass, nothing past them can be kept.
        if best.sum(dtype=np.float64) >= mass:
            ranked = best
    ranked = np.sort(ranked)[::-1].astype(np.float64)
    before = np.cumsum(ranked) - ranked
    return float(ranked[np.count_nonzero(before < mass) - 1])

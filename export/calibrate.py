"""Scales for an int8 KV cache, measured on the model's own keys and values.

GroupQueryAttention stores round(x / scale), saturated to [-128, 127], one scale per
layer, kv head and channel. A scale has to cover the largest value its channel will
hold, so it is measured: the same weights with a float32 cache read the evaluation
text (the one the perplexity gate reads, which then measures what int8 costs), and
each channel's largest magnitude, doubled, becomes 127 steps.

The doubling is headroom for text unlike the calibration text: a saturated value
costs far more than a coarser step. Measured on SmolLM2 calibrated on the built-in
paragraph, perplexity on 1,500 tokens of the README: float32 KV 52.24, int8 with
1x headroom 53.50, 2x 52.20, 3x 52.49 (the built-in text itself: 31.44 / 31.08 / 31.15 / 32.08).

Keys are stored after rotary, which turns each rotate-half pair (i, i + head_dim/2)
by an angle that grows with the position. A short calibration text sees only small
angles on the slow pairs, so a longer context would rotate more of a pair's length
into one channel than calibration saw, and saturate it. The pair's length does not
change with the angle, so both channels of a pair are scaled to the longest pair seen
(measured as above with 1x headroom: README perplexity 59.72 with plain per-channel
key maxima, 53.50 with pair lengths).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgellm.runtime.caches import StaticCache
from edgellm.runtime.providers import create_session
from edgellm.runtime.runner import Runner

from .config import QuantConfig
from .graph import build_fast_graph
from .scratch import scratch_dir
from .sources import Source

Progress = Callable[[str, int, int], None]
_INT8_MAX = 127
_HEADROOM = 2.0


def calibrate_kv_scales(
    source: Source,
    quant: QuantConfig,
    ids: Sequence[int],
    work_dir: Path,
    progress: Progress | None = None,
    *,
    requantize: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Key and value scales, float32 [num_layers, kv_heads, head_dim], for `build_fast_graph(kv_scales=...)`.

    The float32-cache graph is built under `work_dir` (same file system as the
    bundle, so no surprise from a small /tmp) and removed afterwards.
    """
    spec = source.spec
    steps = spec.num_layers + 1
    report = progress or (lambda stage, done, total: None)
    report("calibrate", 0, steps)
    with scratch_dir(work_dir, ".calibrate.") as tmp:
        info = build_fast_graph(source, quant, tmp, lambda _s, done, _t: report("calibrate", done, steps),
                                requantize=requantize)
        cache = StaticCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, len(ids))
        Runner(create_session(tmp / info.file), cache, kind="fast", where="calibration graph").forward(ids)
    scales = kv_scales_from_cache(cache.keys, cache.values, cache.length)
    report("calibrate", steps, steps)
    return scales


def kv_scales_from_cache(
    keys: Sequence[np.ndarray], values: Sequence[np.ndarray], length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scales from float caches [1, kv_heads, >= length, head_dim] per layer (see the module docstring)."""
    k_max = np.stack([_rotary_pair_max(k[0, :, :length]) for k in keys])
    v_max = np.stack([np.abs(v[0, :, :length]).max(axis=1) for v in values])
    return _scale(k_max), _scale(v_max)


def _rotary_pair_max(k: np.ndarray) -> np.ndarray:
    """[kv_heads, rows, head_dim] -> [kv_heads, head_dim]: the longest (i, i + head_dim/2) pair, on both channels."""
    half = k.shape[-1] // 2
    length = np.hypot(k[..., :half], k[..., half:]).max(axis=1)
    return np.concatenate([length, length], axis=-1)


def _scale(peak: np.ndarray) -> np.ndarray:
    # A channel that stayed zero is scaled as if it peaked at 1: any scale is exact
    # for zeros, and a zero scale would divide by zero inside the kernel.
    return (np.where(peak > 0, peak, 1.0) * _HEADROOM / _INT8_MAX).astype(np.float32)

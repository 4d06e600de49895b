"""GGUF block types as MatMulNBits blocks, with no second rounding.

Every common GGUF type stores a weight as `scale * (q - centre) + minimum` over blocks of
16 or 32 values, with small unsigned integer codes q; K-quants only add a level of
indirection (a super-block's f16 d times a 4- or 6-bit sub-block scale, computed here in
float32, where the product is exact). MatMulNBits computes `scale * (code - 2^(bits-1))`
per block, so each type fits it exactly at the narrowest width that holds its codes and
the block its scales change at:

| GGUF type | codes | becomes | minimum |
|---|---|---|---|
| Q4_0, Q3_K | 4, 3 bits | int4 block 32 (Q3_K: block 16) | - |
| Q4_1, Q4_K, Q2_K | 4, 4, 2 bits | int4 block 32 (Q2_K: 16) | per-block offset |
| Q5_0, Q8_0, Q6_K | 5, 8, 6 bits | int8 block 32 (Q6_K: 16) | - |
| Q5_1, Q5_K | 5 bits | int8 block 32 | per-block offset |

One type is read in another form than its exact one (`GGUFType.read_block`, `reblocked`): Q6_K's
blocks of 16 cost an 8-bit weight 2 bits of float32 scale and 2 of block sum at run time on x86.
Its exact values re-rounded to int8 blocks of 64 read 9 bits instead of 12, each within half a
step of at most a quarter of Q6_K's own (not quantize_nbits: onnxruntime's scale, the largest value
/ 128, leaves the other sign's largest a whole step off). Measured on SmolLM2 laid out as Q4_K_M,
10 Q6_K tensors: perplexity 35.43 exact, 35.61 re-blocked (source 34.59).

A minimum becomes the offset `minimum + scale * (2^(b-1) - centre)` after moving the codes
to sit around the middle (quantize.py's offsets; linear.py adds them). Layouts are
ggml-quants.c's; the tests compare every type against gguf-py's own dequantization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgellm.errors import ExportError

from .quantize import QuantizedWeight, pack
from .sources import QuantBlocks


@dataclass(frozen=True)
class _Decoded:
    """A tensor's blocks as `scales * (codes - centre) + minimum`, one scale per block."""

    codes: np.ndarray  # uint8 [N, n_blocks, block]
    scales: np.ndarray  # float32 [N, n_blocks]
    minimum: np.ndarray | None  # float32 [N, n_blocks]
    centre: int
    # K-quants: the super-block's float16 scale [N, n_super] and the int8 sub-block scales
    # [N, n_blocks] whose float32 product `scales` is (QuantizedWeight.scale_factors).
    factors: tuple[np.ndarray, np.ndarray] | None = None


def _f16(raw: np.ndarray) -> np.ndarray:
    """The little-endian float16 in the last axis' 2 bytes, as float32 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: the low nibbles are values 0-15, the high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 bytes of fifth bits -> [..., 32], bit j of the little-endian uint32 for value j."""
    word = np.ascontiguousarray(qh).view("<u4")[..., 0]
    return ((word[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q4_0(raw: np.ndarray) -> _Decoded:
    return _Decoded(_nibbles(raw[..., 2:]), _f16(raw[..., :2]), None, 8)


def _q4_1(raw: np.ndarray) -> _Decoded:
    return _Decoded(_nibbles(raw[..., 4:]), _f16(raw[..., :2]), _f16(raw[..., 2:4]), 0)


def _q5_0(raw: np.ndarray) -> _Decoded:
    codes = _nibbles(raw[..., 6:]) | (_high_bits(raw[..., 2:6]) << 4)
    return _Decoded(codes, _f16(raw[..., :2]), None, 16)


def _q5_1(raw: np.ndarray) -> _Decoded:
    codes = _nibbles(raw[..., 8:]) | (_high_bits(raw[..., 4:8]) << 4)
    return _Decoded(codes, _f16(raw[..., :2]), _f16(raw[..., 2:4]), 0)


def _q8_0(raw: np.ndarray) -> _Decoded:
    codes = (raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return _Decoded(codes, _f16(raw[..., :2]), None, 128)


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit sub-block scales and 8 six-bit minimums."""
    low, mins, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
    minimums = np.concatenate([mins & 0x3F, (high >> 4) | ((mins >> 2) & 0x30)], axis=-1)
    return scales.astype(np.float32), minimums.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 8 sub-blocks of 32: each 32 bytes hold one sub-block low, the next high."""
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return ((qs >> np.array([0, 4], dtype=np.uint8)[:, None]) & 0x0F).reshape(*qs.shape[:-3], 8, 32)


def _super(raw: np.ndarray, codes: np.ndarray, scales: np.ndarray, minimum: np.ndarray | None,
           centre: int, factors: tuple[np.ndarray, np.ndarray] | None = None) -> _Decoded:
    """Sub-blocks of super-blocks [N, n_super, sub, block] as plain blocks [N, n_super * sub, block];
    `factors` (d [N, n_super, 1] as float32, sub-scales [N, n_super, sub]) are kept as float16
    and int8 when `scales` is their product."""
    n = raw.shape[0]
    kept = None if factors is None else (factors[0].reshape(n, -1).astype(np.float16),
                                         factors[1].reshape(n, -1).astype(np.int8))
    return _Decoded(codes.reshape(n, -1, codes.shape[-1]), scales.reshape(n, -1),
                    None if minimum is None else minimum.reshape(n, -1), centre, kept)


def _q4_k(raw: np.ndarray) -> _Decoded:
    d, dmin = _f16(raw[..., 0:2])[..., None], _f16(raw[..., 2:4])[..., None]
    sc, m = _k_scale_min(raw[..., 4:16])
    return _super(raw, _k_nibbles(raw[..., 16:144]), d * sc, -(dmin * m), 0, (d, sc))


def _q5_k(raw: np.ndarray) -> _Decoded:
    d, dmin = _f16(raw[..., 0:2])[..., None], _f16(raw[..., 2:4])[..., None]
    sc, m = _k_scale_min(raw[..., 4:16])
    high = (raw[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # sub-block j: bit j
    return _super(raw, _k_nibbles(raw[..., 48:176]) | (high << 4), d * sc, -(dmin * m), 0, (d, sc))


def _q6_k(raw: np.ndarray) -> _Decoded:
    lead = raw.shape[:-1]
    low = (raw[..., 0:128].reshape(*lead, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8)[:, None]) & 0x0F
    high = (raw[..., 128:192].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03
    codes = (low.reshape(*lead, 8, 32) | (high.reshape(*lead, 8, 32) << 4)).reshape(*lead, 16, 16)
    sc, d = raw[..., 192:208].view(np.int8).astype(np.float32), _f16(raw[..., 208:210])[..., None]
    return _super(raw, codes, sc * d, None, 32, (d, sc))


def _q3_k(raw: np.ndarray) -> _Decoded:
    lead = raw.shape[:-1]
    low = (raw[..., 32:96].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 0x03
    high = (raw[..., 0:32].reshape(*lead, 1, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 0x01
    codes = (low.reshape(*lead, 8, 32) | (high.reshape(*lead, 8, 32) << 2)).reshape(*lead, 16, 16)
    packed = raw[..., 96:108]
    low_sc = (packed[..., None, 0:8] >> np.array([0, 4], dtype=np.uint8)[:, None]).reshape(*lead, 16)
    high_sc = (packed[..., None, 8:12] >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]).reshape(*lead, 16)
    sc = ((low_sc & 0x0F) | ((high_sc & 0x03) << 4)).astype(np.float32) - 32
    return _super(raw, codes, _f16(raw[..., 108:110])[..., None] * sc, None, 4)


def _q2_k(raw: np.ndarray) -> _Decoded:
    lead = raw.shape[:-1]
    sc = raw[..., 0:16]
    codes = ((raw[..., 16:80].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None])
             & 0x03).reshape(*lead, 16, 16)
    d, dmin = _f16(raw[..., 80:82])[..., None], _f16(raw[..., 82:84])[..., None]
    return _super(raw, codes, d * (sc & 0x0F), -(dmin * (sc >> 4)), 0)


@dataclass(frozen=True)
class GGUFType:
    """How one GGUF type is laid out and what MatMulNBits form holds it exactly."""

    values: int  # per GGUF block (super-block for K-quants)
    nbytes: int  # per GGUF block
    code_bits: int
    bits: int  # MatMulNBits bits
    block: int  # MatMulNBits block_size: where its scales change
    decode: Callable[[np.ndarray], _Decoded]
    read_block: int | None = None  # int8 blocks the exact values are re-rounded to (see `reblocked`)


TYPES = {
    "Q4_0": GGUFType(32, 18, 4, 4, 32, _q4_0),
    "Q4_1": GGUFType(32, 20, 4, 4, 32, _q4_1),
    "Q5_0": GGUFType(32, 22, 5, 8, 32, _q5_0),
    "Q5_1": GGUFType(32, 24, 5, 8, 32, _q5_1),
    "Q8_0": GGUFType(32, 34, 8, 8, 32, _q8_0),
    "Q2_K": GGUFType(256, 84, 2, 4, 16, _q2_k),
    "Q3_K": GGUFType(256, 110, 3, 4, 16, _q3_k),
    "Q4_K": GGUFType(256, 144, 4, 4, 32, _q4_k),
    "Q5_K": GGUFType(256, 176, 5, 8, 32, _q5_k),
    "Q6_K": GGUFType(256, 210, 6, 8, 16, _q6_k, read_block=64),
}


def from_gguf_blocks(blocks: QuantBlocks) -> QuantizedWeight:
    """GGUF blocks of any type in TYPES as a MatMulNBits weight in the type's own form (table above)."""
    kind, (n, k) = blocks.ggml_type, blocks.shape
    t = TYPES.get(kind)
    if t is None:
        raise ExportError(f"GGUF type {kind} has no exact MatMulNBits form (expected {', '.join(TYPES)})")
    if k % t.values:
        raise ExportError(f"GGUF {kind} tensor of shape {blocks.shape}: rows are not whole blocks of {t.values}")
    raw = np.ascontiguousarray(blocks.data, dtype=np.uint8).reshape(n, k // t.values, t.nbytes)
    decoded = t.decode(raw)
    # Codes around the middle of the width: symmetric types keep their centre, the others
    # move theirs to the middle of their codes and the offset takes the difference.
    middle = decoded.centre if decoded.minimum is None else 1 << (t.code_bits - 1)
    codes = decoded.codes + np.uint8((1 << (t.bits - 1)) - middle)
    offsets = None
    if decoded.minimum is not None:
        offsets = decoded.minimum + np.float32(middle - decoded.centre) * decoded.scales
    return QuantizedWeight(packed=pack(codes, t.bits), scales=np.ascontiguousarray(decoded.scales, dtype=np.float32),
                           zero_points=None, bits=t.bits, block_size=t.block, K=k, N=n,
                           offsets=None if offsets is None else np.ascontiguousarray(offsets, dtype=np.float32),
                           scale_factors=decoded.factors)


def reblocked(q: QuantizedWeight, block: int, rows: int = 4096) -> tuple[QuantizedWeight, float]:
    """An exactly imported 8-bit weight's values re-rounded to symmetric int8 blocks of `block`
    (see the module docstring), and the relative RMS error that cost; `rows` at a time, so a 1B model's tied table costs no float32
    copy of itself."""
    if q.offsets is not None or q.bits != 8:
        raise ExportError("reblocked: needs a symmetric 8-bit weight")
    n, k = q.N, q.K
    n_blocks = -(-k // block)
    codes = np.empty((n, n_blocks, block), dtype=np.uint8)
    scales = np.empty((n, n_blocks), dtype=np.float32)
    error = total = 0.0
    for start in range(0, n, rows):
        part = slice(start, min(start + rows, n))
        w = (q.packed[part].astype(np.float32) - 128) * q.scales[part, :, None]  # exact: 8-bit codes, no offsets
        padded = np.zeros((w.shape[0], n_blocks * block), dtype=np.float32)
        padded[:, :k] = w.reshape(w.shape[0], -1)[:, :k]
        blocks = padded.reshape(-1, n_blocks, block)
        scales[part] = np.abs(blocks).max(axis=-1) / 127
        safe = np.where(scales[part] == 0, 1, scales[part])[..., None]
        codes[part] = np.clip(np.rint(blocks / safe), -128, 127) + 128
        error += float(np.square((codes[part].astype(np.float32) - 128) * scales[part, :, None] - blocks).sum())
        total += float(np.square(blocks).sum())
    q = QuantizedWeight(packed=pack(codes, 8), scales=scales, zero_points=None, bits=8, block_size=block, K=k, N=n)
    return q, (error / max(total, 1e-60)) ** 0.5

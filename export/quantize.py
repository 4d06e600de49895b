"""Weights into onnxruntime's MatMulNBits layout (the embedding gathers the same initializers).

The block quantization itself is onnxruntime's own (the same routine its
MatMulNBits quantizer calls), so a weight quantized here dequantizes inside the
kernel exactly as onnxruntime expects. This module only lays the results out.

Layout (MatMulNBits, weight W [N out, K in]):
- packed      uint8 [N, n_blocks, blob], blob = block_size * bits / 8; 4-bit values
              two per byte, the first in the low nibble;
- scales      float32 [N, n_blocks];
- zero_points uint8 [N, ceil(n_blocks * bits / 8)] packed like the weights, or None
              for symmetric weights (the kernels then assume 2^(bits-1)).
dequantized = (q - zero_point) * scale, blocks running along K.

GGUF's block types (gguf_blocks.py) map onto this layout exactly, so a GGUF model
keeps the quantization its author chose instead of losing quality to a second
rounding. A type with a per-block minimum (Q4_1's `w = d*q + m`, the K-quants' `-dmin*m`)
becomes the symmetric `d*(q - 8)` plus a per-block offset (`m + 8d`) that the graph adds as
blocksum(x) @ offsets^T: float zero points would be exact too, but onnxruntime's
CPU kernel falls back to dequantize + GEMM for them (about 50x slower), and uint8
zero points cannot hold -m/d. The offsets are one float per block and output, as
many bytes as the scales.

With int8 activations (accuracy_level 4) the graph does not add them as a separate
MatMul: `offset_blocks` writes them as more blocks of codes per output row (three
4-bit digits or two 8-bit ones, each rounding what the previous left), and the graph
appends the activation's block sums to its K, so the one MatMulNBits applies them.
Three extra nodes per linear layer became two per activation, and the kernel reads
codes instead of float32 offsets. The rounding left (at most 3.6e-4 of a block's
largest offset with 4-bit digits, 1.6e-5 with 8-bit ones) is below the kernel's own
int8 rounding of those block sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from edgellm.errors import ExportError

from .config import QuantConfig

_QUANTIZERS = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear weight in MatMulNBits layout (see the module docstring)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    K: int
    N: int
    # float32 [N, n_blocks] added to each block's values (a GGUF type's minimum), or None.
    offsets: np.ndarray | None = None
    # `scales` as the product a GGUF K-quant stores (float16 [N, n_super] super-block scales
    # times int8 [N, n_blocks] sub-block scales, exact in float32), or None: the graph keeps
    # the factors (linear.py) where float32 scales would take 8 bits per 32 values.
    scale_factors: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_blocks(self) -> int:
        return self.packed.shape[1]

    def read_bytes(self, quant: QuantConfig) -> int:
        """Bytes a MatMulNBits of this weight reads per call: codes, scales (in the activations'
        dtype), zero points, and the offsets as linear.py stores them (see folds_offsets)."""
        float_bytes = quant.activation_dtype.itemsize
        total = self.packed.nbytes + self.scales.size * float_bytes
        total += 0 if self.zero_points is None else self.zero_points.nbytes
        if self.offsets is not None and folds_offsets(quant, self.bits):
            blocks = offset_digits(self.bits) * offset_width(self.n_blocks, self.block_size) // self.block_size
            total += self.N * blocks * (self.block_size * self.bits // 8 + float_bytes)
        elif self.offsets is not None:
            total += self.offsets.size * float_bytes
        return total


def quantize_nbits(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """Block-quantize `w` [out, in] (HF layout) along `in` with onnxruntime's quantizer."""
    if bits not in _QUANTIZERS:
        raise ExportError(f"quantization bits {bits}: expected 4 or 8")
    if w.ndim != 2:
        raise ExportError(f"quantize: expected a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    n_blocks = -(-k // block_size)
    # The quantizer reads the MatMul operand [K, N] row-major, padded to whole blocks.
    src = np.zeros((n_blocks * block_size, n), dtype=np.float32)
    src[:k] = w.T
    packed = np.zeros((n, n_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, n_blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-n_blocks * bits // 8)), dtype=np.uint8)
    _QUANTIZERS[bits](packed, src, scales, zero_points, block_size, n, n_blocks * block_size, symmetric)
    return QuantizedWeight(
        packed=packed,
        scales=scales,
        zero_points=None if symmetric else zero_points,
        bits=bits,
        block_size=block_size,
        K=k,
        N=n,
    )


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights along N (e.g. q;k;v): blocks run along K, so rows are independent."""
    first = parts[0]
    if any((p.bits, p.block_size, p.K) != (first.bits, first.block_size, first.K) for p in parts):
        raise ExportError("concat_rows: weights differ in bits, block size or K")
    any_zp = any(p.zero_points is not None for p in parts)
    any_offsets = any(p.offsets is not None for p in parts)
    return QuantizedWeight(
        packed=np.concatenate([p.packed for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        # A symmetric part among asymmetric ones spells out its implicit zero point.
        zero_points=np.concatenate([_packed_zero_points(p) for p in parts]) if any_zp else None,
        bits=first.bits,
        block_size=first.block_size,
        K=first.K,
        N=sum(p.N for p in parts),
        offsets=np.concatenate([_offsets(p) for p in parts]) if any_offsets else None,
        scale_factors=_concat_factors(parts),
    )


def _concat_factors(parts: list[QuantizedWeight]) -> tuple[np.ndarray, np.ndarray] | None:
    """The parts' scale factors stacked along N, if every part has them in one layout."""
    factors = [p.scale_factors for p in parts]
    if any(f is None for f in factors) or len({f[0].shape[1] for f in factors}) != 1:
        return None
    return np.concatenate([f[0] for f in factors]), np.concatenate([f[1] for f in factors])


def _packed_zero_points(q: QuantizedWeight) -> np.ndarray:
    if q.zero_points is not None:
        return q.zero_points
    width = -(-q.n_blocks * q.bits // 8)
    mid = 1 << (q.bits - 1)
    return np.full((q.N, width), mid | (mid << 4) if q.bits == 4 else mid, dtype=np.uint8)


def _offsets(q: QuantizedWeight) -> np.ndarray:
    return np.zeros((q.N, q.n_blocks), dtype=np.float32) if q.offsets is None else q.offsets


def folds_offsets(quant: QuantConfig, bits: int) -> bool:
    """Whether a MatMulNBits carries its weight's offsets as extra blocks of codes (int8
    activations) rather than as float32 beside it: a MatMul + Add for exact float
    activations, float zero points for openvino's int4 (linear.py), the same bytes."""
    return quant.accuracy_level != 0 and not (quant.target == "openvino" and bits == 4)


def offset_digits(bits: int) -> int:
    """Blocks of codes that carry the offsets (see offset_blocks): three 4-bit digits leave at
    most 3.6e-4 of the largest, two 8-bit ones 1.6e-5."""
    return 3 if bits == 4 else 2


def offset_width(n_blocks: int, block_size: int) -> int:
    """K columns one copy of the block sums takes: `n_blocks` sums padded to whole blocks."""
    return -(-n_blocks // block_size) * block_size


def offset_blocks(q: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """`q.offsets` as extra MatMulNBits blocks, to append after `q.packed` and `q.scales`.

    The extra K columns read `offset_digits(bits)` copies of blocksum(x), each copy padded to
    whole blocks; digit j's codes round what digits 0..j-1 left of each offset, with a scale
    per block of its own. Returns (packed [N, digits * width / block, blob], scales).
    """
    if q.offsets is None or q.zero_points is not None:
        raise ExportError("offset_blocks: needs a symmetric weight with offsets")
    levels = (1 << (q.bits - 1)) - 1
    width = offset_width(q.n_blocks, q.block_size)
    residual = np.zeros((q.N, width), dtype=np.float64)
    residual[:, : q.n_blocks] = q.offsets
    residual = residual.reshape(q.N, width // q.block_size, q.block_size)
    codes, scales = [], []
    for _ in range(offset_digits(q.bits)):
        scale = (np.abs(residual).max(axis=-1) / levels).astype(np.float32)
        safe = np.where(scale == 0, 1, scale).astype(np.float64)[..., None]
        digit = np.clip(np.rint(residual / safe), -levels - 1, levels)
        residual = residual - digit * scale.astype(np.float64)[..., None]
        codes.append((digit + (levels + 1)).astype(np.uint8))
        scales.append(scale)
    return pack(np.concatenate(codes, axis=1), q.bits), np.concatenate(scales, axis=1)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., block_size] in MatMulNBits' layout: 4-bit values two per byte,
    the first in the low nibble; 8-bit as they are. The inverse of `unpack`."""
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4) if bits == 4 else codes
    return np.ascontiguousarray(packed, dtype=np.uint8)


def unpack(q: QuantizedWeight) -> np.ndarray:
    """The integer codes, uint8 [N, n_blocks, block_size]."""
    if q.bits == 8:
        return q.packed.copy()
    low = q.packed & 0x0F
    high = q.packed >> 4
    return np.stack([low, high], axis=-1).reshape(q.N, q.n_blocks, q.block_size)


def zero_point_values(q: QuantizedWeight) -> np.ndarray:
    """Per-block zero points, uint8 [N, n_blocks] (2^(bits-1) when symmetric)."""
    if q.zero_points is None:
        return np.full((q.N, q.n_blocks), 1 << (q.bits - 1), dtype=np.uint8)
    if q.bits == 8:
        return q.zero_points[:, : q.n_blocks]
    low = q.zero_points & 0x0F
    high = q.zero_points >> 4
    return np.stack([low, high], axis=-1).reshape(q.N, -1)[:, : q.n_blocks]


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """Back to float32 [N, K]: what the kernels multiply by, plus any offsets."""
    codes = unpack(q).astype(np.float32)
    zp = zero_point_values(q).astype(np.float32)[..., None]
    w = (codes - zp) * q.scales[..., None]
    if q.offsets is not None:
        w = w + q.offsets[..., None]
    return w.reshape(q.N, -1)[:, : q.K]

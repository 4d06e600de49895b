"""Weights into onnxruntime's MatMulNBits / GatherBlockQuantized layout.

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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from edgellm.errors import ExportError

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

    @property
    def n_blocks(self) -> int:
        return self.packed.shape[1]

    def gather_table(self) -> np.ndarray:
        """`packed` as the rank-2 uint8 table GatherBlockQuantized reads (quantize_axis=1).

        Rows keep their K padding to whole blocks, so a gathered row has
        n_blocks * block_size values; the graph slices the padding off.
        """
        return self.packed.reshape(self.N, -1)


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
    zps = [p.zero_points for p in parts]
    return QuantizedWeight(
        packed=np.concatenate([p.packed for p in parts]),
        scales=np.concatenate([p.scales for p in parts]),
        zero_points=None if any(z is None for z in zps) else np.concatenate(zps),
        bits=first.bits,
        block_size=first.block_size,
        K=first.K,
        N=sum(p.N for p in parts),
    )


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
    """Back to float32 [N, K]: what the kernels multiply by."""
    codes = unpack(q).astype(np.float32)
    zp = zero_point_values(q).astype(np.float32)[..., None]
    w = (codes - zp) * q.scales[..., None]
    return w.reshape(q.N, -1)[:, : q.K]

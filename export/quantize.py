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

GGUF's Q4_0, Q4_1 and Q8_0 blocks (32 values, fp16 scale) map onto this layout
exactly, so a GGUF model keeps the quantization its author chose instead of
losing quality to a second rounding. Q4_1's `w = d*q + m` becomes the symmetric
`d*(q - 8)` plus a per-block offset `m + 8d` that the graph adds as
blocksum(x) @ offsets^T: float zero points would be exact too, but onnxruntime's
CPU kernel falls back to dequantize + GEMM for them (about 50x slower), and uint8
zero points cannot hold -m/d. The offsets are one float per block and output, as
many bytes as the scales.

With int8 activations (accuracy_level 4) the graph does not add them as a separate
MatMul: `offset_blocks` writes them as three more blocks of codes per output row
(each rounding what the previous left, 12 bits in all), and the graph appends the
activation's block sums to its K, so the one MatMulNBits applies them. Three extra
nodes per linear layer became two per activation, and the kernel reads 4-bit codes
instead of float32 offsets. The rounding left (at most 3.6e-4 of a block's largest
offset, 4-bit digits) is below the kernel's own int8 rounding of those block sums.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from edgellm.errors import ExportError

from .config import QuantConfig
from .sources import QuantBlocks, Source

_QUANTIZERS = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}
GGUF_BLOCK = 32
# Bytes per GGUF block: fp16 scale (and fp16 min for Q4_1), then the codes.
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
_TYPE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


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
    # float32 [N, n_blocks] added to each block's values (GGUF Q4_1's minimum), or None.
    offsets: np.ndarray | None = None

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
    )


def _packed_zero_points(q: QuantizedWeight) -> np.ndarray:
    if q.zero_points is not None:
        return q.zero_points
    width = -(-q.n_blocks * q.bits // 8)
    mid = 1 << (q.bits - 1)
    return np.full((q.N, width), mid | (mid << 4) if q.bits == 4 else mid, dtype=np.uint8)


def _offsets(q: QuantizedWeight) -> np.ndarray:
    return np.zeros((q.N, q.n_blocks), dtype=np.float32) if q.offsets is None else q.offsets


# Blocks of codes that carry the offsets (see offset_blocks): 3 leave at most 3.6e-4 of the largest.
OFFSET_DIGITS = 3


def offset_width(n_blocks: int, block_size: int) -> int:
    """K columns one copy of the block sums takes: `n_blocks` sums padded to whole blocks."""
    return -(-n_blocks // block_size) * block_size


def offset_blocks(q: QuantizedWeight, digits: int = OFFSET_DIGITS) -> tuple[np.ndarray, np.ndarray]:
    """`q.offsets` as extra MatMulNBits blocks, to append after `q.packed` and `q.scales`.

    The extra K columns read `digits` copies of blocksum(x), each copy padded to whole
    blocks; digit j's codes round what digits 0..j-1 left of each offset, with a scale
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
    for _ in range(digits):
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


# --- GGUF blocks -------------------------------------------------------------


def from_gguf_blocks(blocks: QuantBlocks, bits: int | None = None) -> QuantizedWeight:
    """GGUF Q4_0 / Q4_1 / Q8_0 blocks as MatMulNBits blocks, with no rounding.

    `bits` (default: the type's own) may widen 4-bit types to 8 bits, so they fuse
    with a Q8_0 neighbour: code q - 8 is the same as code q + 120 around 128.
    """
    kind, (n, k) = blocks.ggml_type, blocks.shape
    own = _TYPE_BITS.get(kind)
    if own is None:
        raise ExportError(f"GGUF type {kind} has no exact MatMulNBits form (expected Q4_0, Q4_1 or Q8_0)")
    bits = bits or own
    if bits < own or bits not in _QUANTIZERS:
        raise ExportError(f"GGUF {kind} blocks cannot be stored in {bits} bits")
    if k % GGUF_BLOCK:
        raise ExportError(f"GGUF {kind} tensor of shape {blocks.shape}: rows are not whole blocks of {GGUF_BLOCK}")
    n_blocks = k // GGUF_BLOCK
    raw = np.ascontiguousarray(blocks.data).reshape(n, n_blocks, _BLOCK_BYTES[kind])
    scales = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    offsets = None
    if kind == "Q8_0":
        codes = (raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        qs = raw[..., 4:] if kind == "Q4_1" else raw[..., 2:]
        # GGUF keeps value j in the low nibble and j + 16 in the high nibble of byte j.
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        if kind == "Q4_1":
            minimum = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            # d*q + m == d*(q - 8) + (m + 8d): the symmetric kernel plus an offset.
            offsets = minimum + np.float32(8) * scales
        if bits == 8:
            codes = codes + np.uint8(120)
    return QuantizedWeight(
        packed=pack(codes, bits),
        scales=np.ascontiguousarray(scales),
        zero_points=None,
        bits=bits,
        block_size=GGUF_BLOCK,
        K=k,
        N=n,
        offsets=offsets,
    )


class WeightLoader:
    """Linear weights from a source in MatMulNBits form, GGUF blocks imported exactly where they can be.

    Exact import applies to int4 requests at GGUF's block size 32 (a different block
    size is a request to re-quantize). Q8_0 stays 8-bit even then: rounding it to 4
    bits is exactly the loss exact import avoids. Counts what it did, for the notes.
    """

    def __init__(self, source: Source, quant: QuantConfig, exact: bool = True) -> None:
        self.source = source
        self.quant = quant
        self.bits = {"int4": 4, "int8": 8}[quant.weights]
        self.exact = exact and quant.weights == "int4" and quant.block_size == GGUF_BLOCK
        self._done: Counter[tuple[str, str, int]] = Counter()  # (action, source type, bits)
        self._types = _stored_types(source)

    def load(self, names: list[str]) -> QuantizedWeight:
        """The weights `names` ([out, in] each), stacked along out into one MatMulNBits weight."""
        blocks = [self.source.quant_blocks(n) if self.exact else None for n in names]
        bits = max([self.bits] + [_TYPE_BITS[b.ggml_type] for b in blocks if b is not None])
        parts = []
        for name, block in zip(names, blocks):
            if block is not None:
                parts.append(from_gguf_blocks(block, bits))
                self._done["imported", block.ggml_type, bits] += 1
            else:
                parts.append(quantize_nbits(self.source.tensor(name), bits, self.quant.block_size, self.quant.symmetric))
                self._done["quantized", self._types.get(name, "float"), bits] += 1
        return concat_rows(parts) if len(parts) > 1 else parts[0]

    def notes(self) -> list[str]:
        """One line per (what was done, source type), e.g. 're-quantized 60 Q6_K tensors to int4 block 32'."""
        lines = []
        for (action, kind, bits), count in sorted(self._done.items()):
            tensors = f"{count} {kind} tensor{'s' if count > 1 else ''}"
            if action == "imported":
                line = f"imported {tensors} exactly as int{bits} MatMulNBits block {GGUF_BLOCK}"
                if kind == "Q4_1":
                    line += " plus a per-block offset"
                if kind == "Q8_0" and bits > self.bits:
                    line += f" (kept at 8 bits: re-quantizing to {self.bits} would lose quality)"
                elif bits > _TYPE_BITS[kind]:
                    line += " (widened to share a fused matmul with Q8_0 rows)"
            else:
                verb = "quantized" if kind in ("float", "F32", "F16", "BF16") else "re-quantized"
                sym = "symmetric" if self.quant.symmetric else "asymmetric"
                line = f"{verb} {tensors} to int{bits} block {self.quant.block_size} {sym}"
            lines.append(line)
        return lines


def _stored_types(source: Source) -> dict[str, str]:
    """GGUF type names by HF tensor name; empty for float sources."""
    return getattr(source, "stored_types", {})

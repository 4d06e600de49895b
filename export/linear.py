"""Writing an ONNX graph: nodes, streamed initializers, and linear layers in each storage.

A linear layer is MatMulNBits (int4/int8 blocks, GGUF blocks imported as they are) or a
MatMul on a transposed float matrix (fp32/fp16). GGUF Q4_1 offsets are applied one of
two ways (see quantize.py): with int8 activations as extra blocks of codes inside the
MatMulNBits, fed by the activation's block sums appended to its K; with fp32
activations (accuracy_level 0, exact) as a float MatMul plus an Add.

Every float the activations meet (scales, biases, offsets, norm weights) is written in
the activations' dtype (`Writer.floats`): float32 for the CPU, float16 for CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellm.errors import ExportError

from .config import QuantConfig
from .quantize import QuantizedWeight, folds_offsets, offset_blocks, offset_width
from .sources import Source
from .weights import WeightLoader

_ALIGN = 4096  # page-aligned external data can be memory-mapped
_INLINE_BYTES = 1024
_CONTRIB = {"GroupQueryAttention", "MatMulNBits", "SkipSimplifiedLayerNormalization"}


class Writer:
    """Collects nodes; streams initializer bytes to the external data file as they come."""

    def __init__(self, data_path: Path, float_type: np.dtype = np.dtype(np.float32)) -> None:
        self.float_type = np.dtype(float_type)
        self.float_proto = helper.np_dtype_to_tensor_dtype(self.float_type)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._location = data_path.name
        self._fh = open(data_path, "wb")
        self._consts: dict[tuple, str] = {}
        self._blocksums: dict[tuple[str, int, int], str] = {}
        self._with_sums: dict[tuple[str, int, int], str] = {}
        self._indicators: dict[tuple[int, int, int], str] = {}
        # Some MatMulNBits reads appended block sums: its activations must be quantized per
        # block (Graph.block_sums), as MLAS does; KleidiAI's one scale a row loses them.
        self.block_sums = False

    def close(self) -> None:
        self._fh.close()

    def initializer(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.dims.extend(array.shape)
        if array.nbytes < _INLINE_BYTES:
            tensor.raw_data = array.tobytes()
        else:
            offset = -(-self._fh.tell() // _ALIGN) * _ALIGN
            self._fh.seek(offset)
            self._fh.write(array.tobytes())
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self._location), ("offset", offset), ("length", array.nbytes)):
                tensor.external_data.add(key=key, value=str(value))
        self.initializers.append(tensor)
        return name

    def floats(self, name: str, array: np.ndarray) -> str:
        """An initializer the activations meet, in their dtype (kernels take one T for both)."""
        return self.initializer(name, np.asarray(array).astype(self.float_type))

    def exact_floats(self, name: str, array: np.ndarray, compact: bool) -> str:
        """`floats`, but held as float16 in the file where that is exact (GGUF's block scales are
        float16) and the activations are float32 (`compact`: the cpu target): a Cast of it that
        onnxruntime's constant folding turns back into the same float32 tensor when it loads the
        graph, before MatMulNBits prepacks it. MatMulNBits takes its scales in the activations'
        dtype: without this a 4-bit weight would carry 4 bytes of scale per 16 of codes on disk."""
        array = np.asarray(array, dtype=np.float32)
        half = array.astype(np.float16)
        if not compact or self.float_type != np.float32 or not np.array_equal(half.astype(np.float32), array):
            return self.floats(name, array)
        stored = self.initializer(f"{name}.float16", half)
        return self.node("Cast", f"{name}/Cast", [stored], [name], to=self.float_proto)[0]

    def factored_floats(self, name: str, factors: tuple[np.ndarray, np.ndarray]) -> str:
        """Block scales held as a GGUF K-quant holds them: float16 super-block scales [N, n_super]
        times int8 sub-block scales [N, n_blocks] (0.31 bits a value where float32 per block of 32
        takes 1). Casts, a Mul and a Reshape that onnxruntime folds at load into the float32
        scales; the product (11 by 7 significant bits) is exact in float32, as in the decoder."""
        top, sub = factors
        n, n_super = top.shape
        top = self.initializer(f"{name}.super.float16", top.reshape(n, n_super, 1))
        sub = self.initializer(f"{name}.sub.int8", sub.reshape(n, n_super, -1))
        product = self.one("Mul", f"{name}/Mul", [self.one("Cast", f"{name}/super/Cast", [top], to=self.float_proto),
                                                   self.one("Cast", f"{name}/sub/Cast", [sub], to=self.float_proto)])
        return self.node("Reshape", f"{name}/Reshape", [product, self.const([n, -1])], [name])[0]

    def const(self, values: list[int] | int) -> str:
        """A shared int64 constant (a scalar when `values` is an int)."""
        key = (values,) if isinstance(values, int) else tuple(values)
        if key not in self._consts:
            array = np.array(values, dtype=np.int64)
            self._consts[key] = self.initializer(f"/const/int64/{values}", array)
        return self._consts[key]

    def fconst(self, values: float | list[float], dtype: np.dtype | type | None = None) -> str:
        """A shared float constant (a scalar when `values` is a float), in the activations'
        dtype unless `dtype` says."""
        dtype = np.dtype(dtype or self.float_type)
        key = (values if isinstance(values, float) else tuple(values), dtype.name)
        if key not in self._consts:
            label = "_".join(f"{v:g}" for v in np.atleast_1d(values))
            self._consts[key] = self.initializer(f"/const/{dtype.name}/{label}", np.array(values, dtype=dtype))
        return self._consts[key]

    def blocksum(self, x: str, K: int, block_size: int, width: int | None = None) -> str:
        """Sums of `x` [1, S, K] over each block along K, [1, S, width] (zero past K / block);
        shared by all readers of `x`."""
        width = width or K // block_size
        key = (x, block_size, width)
        if key not in self._blocksums:
            # One MatMul instead of Reshape + ReduceSum: a node fewer per activation,
            # and the indicator is shared by every layer, so it stays in cache.
            indicator = self._indicator(K, block_size, width)
            # Named by block and width: blocks of 16 and of 32 may sum one activation.
            self._blocksums[key] = self.one("MatMul", f"{x}/blocksum_{block_size}x{width}/MatMul", [x, indicator])
        return self._blocksums[key]

    def with_block_sums(self, x: str, K: int, block_size: int, extra: int) -> str:
        """`x` with copies of its block sums appended along K, `extra` columns in all, for
        a MatMulNBits whose last blocks hold offsets (quantize.offset_blocks)."""
        width = offset_width(K // block_size, block_size)
        key = (x, block_size, extra)
        self.block_sums = True
        if key not in self._with_sums:
            sums = self.blocksum(x, K, block_size, width)
            self._with_sums[key] = self.one("Concat", f"{x}/with_block_sums_{block_size}x{extra}/Concat",
                                            [x] + [sums] * (extra // width), axis=-1)
        return self._with_sums[key]

    def _indicator(self, K: int, block_size: int, width: int) -> str:
        """[K, width] in the activations' dtype: 1 where row k lies in block column b."""
        key = (K, block_size, width)
        if key not in self._indicators:
            matrix = np.zeros((K, width), dtype=self.float_type)
            matrix[np.arange(K), np.arange(K) // block_size] = 1
            self._indicators[key] = self.initializer(f"/const/blocksum/{K}x{width}", matrix)
        return self._indicators[key]

    def node(self, op: str, name: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> list[str]:
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        while inputs and inputs[-1] == "":
            inputs = inputs[:-1]
        domain = "com.microsoft" if op in _CONTRIB else None
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def one(self, op: str, name: str, inputs: list[str], **attrs) -> str:
        return self.node(op, name, inputs, 1, **attrs)[0]


@dataclass(frozen=True)
class Linear:
    """Initializer names of one linear layer, in whichever storage the quant config picks."""

    weight: str  # MatMulNBits B, or the transposed [K, N] float matrix
    K: int
    N: int
    scales: str = ""
    zero_points: str = ""
    bias: str = ""
    bits: int = 0
    block_size: int = 0
    cast: bool = False  # stored in another dtype than the activations': Cast before the MatMul
    offsets: str = ""  # float32 [n_blocks, N]: y += blocksum(x) @ offsets (GGUF Q4_1, K-quants)
    folded: int = 0  # K columns past K that hold the offsets (fed block sums), instead of `offsets`
    # Fused weights in different forms (weights.py): one MatMulNBits each, outputs concatenated.
    parts: tuple["Linear", ...] = ()


def weight_bits(quant: QuantConfig) -> int:
    return {"int4": 4, "int8": 8}.get(quant.weights, 0)


def quantized_linear(
    w: Writer, prefix: str, q: QuantizedWeight, bias: np.ndarray | None, quant: QuantConfig, *,
    matmul: bool = True,
) -> Linear:
    """Write `q`'s initializers for a MatMulNBits, or for the embedding's gather alone (not `matmul`)."""
    if q.offsets is not None and q.K % q.block_size:
        raise ExportError(f"{prefix}: K {q.K} is not whole blocks of {q.block_size}, offsets need them")
    # onnxruntime's CPU kernel (the quality gate's) refuses float zero points on 8-bit weights (GGUF
    # Q5_1, Q5_K): those keep the MatMul + Add.
    if matmul and q.offsets is not None and quant.target == "openvino" and q.bits == 4:
        scales, zeros = _float_zero_points(prefix, q)
        return Linear(weight=w.initializer(f"{prefix}.qweight", q.packed), scales=w.floats(f"{prefix}.scales", scales),
                      zero_points=w.floats(f"{prefix}.qzeros", zeros.reshape(-1)),
                      bias="" if bias is None else w.floats(f"{prefix}.bias", bias),
                      K=q.K, N=q.N, bits=q.bits, block_size=q.block_size)
    # The cpu target keeps a 4-bit weight's GGUF scales at the GGUF's own width (float32 when
    # folded at load; the x86 kernel reads that tensor at run time). An 8-bit weight's stay float32
    # in the file: its kernel reads only its packed copy, yet onnxruntime keeps the scales input
    # (a folded one resident, a mapped one as pages runtime/residency.py gives back).
    compact = quant.target == "cpu" and w.float_type == np.float32 and q.bits == 4
    extra = offset_blocks(q) if matmul and q.offsets is not None and folds_offsets(quant, q.bits) else None
    packed, folded = q.packed, 0
    if extra is not None and not compact:  # one tensor, nothing to fold
        scales = w.floats(f"{prefix}.scales", np.concatenate([q.scales, extra[1]], axis=1))
    elif compact and q.scale_factors is not None:
        scales = w.factored_floats(f"{prefix}.scales", q.scale_factors)
    else:
        scales = w.exact_floats(f"{prefix}.scales", q.scales, compact)
    if extra is not None:
        packed = np.concatenate([packed, extra[0]], axis=1)
        if compact:  # a Concat onnxruntime folds at load: the weight's own scales stay float16 where they are
            scales = w.one("Concat", f"{prefix}.scales/Concat",
                           [scales, w.exact_floats(f"{prefix}.offset_scales", extra[1], compact)], axis=1)
        folded = extra[0].shape[1] * q.block_size
    # A gathered row adds its offsets from the float table; so does an unfolded matmul.
    table = q.offsets is not None and not folded
    return Linear(
        weight=w.initializer(f"{prefix}.qweight", packed),
        scales=scales,
        zero_points="" if q.zero_points is None else w.initializer(f"{prefix}.qzeros", q.zero_points),
        bias="" if bias is None else w.floats(f"{prefix}.bias", bias),
        K=q.K,
        N=q.N,
        bits=q.bits,
        block_size=q.block_size,
        offsets=w.floats(f"{prefix}.offsets", q.offsets.T) if table else "",
        folded=folded,
    )


def gathered_codes(w: Writer, name: str, packed: str, bits: int, shape: list[int]) -> str:
    """Gathered uint8 MatMulNBits bytes -> their codes as activations-dtype floats; 4-bit ones
    (two a byte, the first in the low nibble) reshaped to `shape`. Float arithmetic, exact for
    0..255 in float16 too (OpenVINO's provider takes no BitwiseAnd): floor(byte * [1, 1/16])
    mod 16 is [low, high]."""
    codes = w.one("Cast", f"{name}/Cast", [packed], to=w.float_proto)
    if bits == 4:
        pairs = w.one("Mul", f"{name}/nibbles/Mul", [w.one("Unsqueeze", f"{name}/Unsqueeze", [codes, w.const([-1])]),
                                                     w.fconst([1.0, 1 / 16])])
        pairs = w.one("Mod", f"{name}/nibbles/Mod", [w.one("Floor", f"{name}/nibbles/Floor", [pairs]),
                                                     w.fconst(16.0)], fmod=1)
        codes = w.one("Reshape", f"{name}/codes", [pairs, w.const(shape)])
    return codes


def _float_zero_points(prefix: str, q: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1's `d*(q - 8) + offset` as `d*(q - zero)` with a float zero point per block.

    OpenVINO decompresses float zero points inside its int4 matmul, exactly and at no cost,
    where the offsets as a separate MatMul + Add took ~40% of a SmolLM2 decode step (onnxruntime's
    CPU kernel is the one that falls back to dequantize + GEMM for them, see quantize.py).
    A block of scale 0 holds one value; it gets scale 1 and zero = code - offset."""
    if q.zero_points is not None:
        raise ExportError(f"{prefix}: offsets on top of zero points cannot become float zero points")
    mid = float(1 << (q.bits - 1))
    scales = q.scales.astype(np.float32).copy()
    flat = scales == 0
    safe = np.where(flat, 1.0, scales)
    zeros = (mid - q.offsets / safe).astype(np.float32)
    if flat.any():
        codes = np.stack([q.packed & 0x0F, q.packed >> 4], axis=-1).reshape(q.N, q.n_blocks, -1)
        if not (codes[flat] == codes[flat][:, :1]).all():
            raise ExportError(f"{prefix}: a block of scale 0 holds different codes")
        zeros[flat] = codes[flat][:, 0] - q.offsets[flat]
        scales[flat] = 1.0
    return scales, zeros


def make_linear(
    w: Writer,
    prefix: str,
    source: Source,
    names: list[str],
    quant: QuantConfig,
    loader: WeightLoader | None,
    bias: np.ndarray | None = None,
) -> Linear:
    """Store the weights `names` [out, in] (row blocks fused into one matrix) as `quant` says."""
    if loader is not None:
        groups = loader.load(names)
        if len(groups) == 1:
            return quantized_linear(w, prefix, groups[0], bias, quant)
        parts, start = [], 0
        for j, q in enumerate(groups):
            part_bias = None if bias is None else bias[start : start + q.N]
            parts.append(quantized_linear(w, f"{prefix}.{j}", q, part_bias, quant))
            start += q.N
        return Linear(weight="", K=parts[0].K, N=start, parts=tuple(parts))
    weights = [source.tensor(n) for n in names]
    matrix = np.concatenate(weights).T if len(weights) > 1 else weights[0].T
    dtype = np.float16 if quant.weights == "fp16" else np.float32
    return Linear(
        weight=w.initializer(f"{prefix}.weight_t", matrix.astype(dtype)),
        bias="" if bias is None else w.floats(f"{prefix}.bias", bias),
        K=matrix.shape[0],
        N=matrix.shape[1],
        cast=dtype != w.float_type,
    )


def apply_linear(w: Writer, name: str, x: str, lin: Linear, quant: QuantConfig, out: str | None = None) -> str:
    outputs = [out] if out else 1
    if lin.parts:
        ys = [apply_linear(w, f"{name}/part_{j}", x, part, quant) for j, part in enumerate(lin.parts)]
        return w.node("Concat", f"{name}/Concat", ys, outputs, axis=-1)[0]
    if lin.bits:
        if lin.folded:
            x = w.with_block_sums(x, lin.K, lin.block_size, lin.folded)
        y = w.node(
            "MatMulNBits",
            f"{name}/MatMulNBits",
            [x, lin.weight, lin.scales, lin.zero_points, "", lin.bias],
            1 if lin.offsets and not lin.folded else outputs,
            K=lin.K + lin.folded,
            N=lin.N,
            bits=lin.bits,
            block_size=lin.block_size,
            accuracy_level=quant.accuracy_level,
        )[0]
        if not lin.offsets or lin.folded:
            return y
        offset = w.one("MatMul", f"{name}/offsets/MatMul", [w.blocksum(x, lin.K, lin.block_size), lin.offsets])
        return w.node("Add", f"{name}/offsets/Add", [y, offset], outputs)[0]
    weight = w.one("Cast", f"{name}/Cast", [lin.weight], to=w.float_proto) if lin.cast else lin.weight
    if not lin.bias:
        return w.node("MatMul", f"{name}/MatMul", [x, weight], outputs)[0]
    y = w.one("MatMul", f"{name}/MatMul", [x, weight])
    return w.node("Add", f"{name}/Add", [y, lin.bias], outputs)[0]

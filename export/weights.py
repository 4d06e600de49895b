"""Which form each linear weight takes: a GGUF type's own blocks, or a fresh rounding.

Exact import applies to int4 requests at block 32 (the default; a different block size or
`--requantize` asks for a fresh rounding): every GGUF type in gguf_blocks.TYPES keeps its
own codes, at the width and block its codes and scales need (Q8_0 and Q6_K stay 8-bit),
except that Q6_K's values are read at int8 block 64 (gguf_blocks.reblocked). Weights fused
into one projection (q;k;v, gate;up) share a MatMulNBits when they share a form; where they
differ (a Q6_K v beside Q4_K q and k) each form gets its own and the graph concatenates the
outputs, which costs a node where widening the narrower rows would cost their bytes on every
token.

The loader counts what it did for the manifest's notes (bits a weight read per type) and
measures what each fresh rounding lost, for the quality gate's message.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .config import QuantConfig
from .gguf_blocks import TYPES, from_gguf_blocks, reblocked
from .quantize import QuantizedWeight, concat_rows, dequantize, quantize_nbits
from .sources import Source

FLOAT_TYPES = ("float", "F32", "F16", "BF16")


@dataclass(frozen=True)
class _Part:
    q: QuantizedWeight
    imported: bool
    kind: str  # the GGUF type name, or "float" for HF sources


@dataclass
class _Tally:
    tensors: int = 0
    weights: int = 0
    read_bytes: float = 0.0


class WeightLoader:
    """Linear weights from a source in MatMulNBits form, GGUF blocks imported exactly where they can be."""

    def __init__(self, source: Source, quant: QuantConfig, exact: bool = True) -> None:
        self.source = source
        self.quant = quant
        self.bits = {"int4": 4, "int8": 8}[quant.weights]
        self.exact = exact and quant.weights == "int4" and quant.block_size == 32
        self._types: dict[str, str] = getattr(source, "stored_types", {})  # GGUF type names; empty for HF
        # (imported, source type, bits, block, offsets) -> what it cost
        self._done: dict[tuple[bool, str, int, int, bool], _Tally] = {}
        # Relative RMS error of each freshly rounded weight against the source's values.
        self.errors: dict[str, float] = {}
        # The largest relative RMS error of a type whose exact values were re-blocked (gguf_blocks.reblocked).
        self._reblock_errors: dict[str, float] = {}
        self._fresh_bits: dict[str, int] = {}
        # lm_head, and the embedding when it is lm_head's table: what quant.head_bits sets.
        tied = source.spec.tie_embeddings
        self._head = {"lm_head.weight"} | ({"model.embed_tokens.weight"} if tied else set())

    def load(self, names: list[str]) -> list[QuantizedWeight]:
        """The weights `names` ([out, in] each) stacked along out: one MatMulNBits weight per
        run of neighbours that share a form (bits, block size), in order."""
        groups: list[list[_Part]] = []
        for name in names:
            part = self._part(name)
            last = groups[-1][0].q if groups else None
            if last is not None and (last.bits, last.block_size) == (part.q.bits, part.q.block_size):
                groups[-1].append(part)
            else:
                groups.append([part])
        weights = []
        for group in groups:
            q = concat_rows([p.q for p in group]) if len(group) > 1 else group[0].q
            per_row = q.read_bytes(self.quant) / q.N
            for p in group:
                key = (p.imported, p.kind, q.bits, q.block_size, p.q.offsets is not None)
                tally = self._done.setdefault(key, _Tally())
                tally.tensors += 1
                tally.weights += p.q.N * p.q.K
                tally.read_bytes += p.q.N * per_row
            weights.append(q)
        return weights

    def _part(self, name: str) -> _Part:
        kind = self._types.get(name, "float")
        head_bits = self.quant.head_bits if name in self._head else None
        bits = head_bits or self.bits
        blocks = self.source.quant_blocks(name) if self.exact and kind in TYPES else None
        if blocks is not None:
            imported = from_gguf_blocks(blocks)
            if head_bits is None or imported.bits <= head_bits:  # a head no wider than --head-bits stays
                if TYPES[kind].read_block:
                    imported, err = reblocked(imported, TYPES[kind].read_block)
                    self._reblock_errors[kind] = max(err, self._reblock_errors.get(kind, 0.0))
                return _Part(imported, True, kind)
        w = self.source.tensor(name)
        q = quantize_nbits(w, bits, self.quant.block_size, self.quant.symmetric)
        self.errors[name] = float(np.linalg.norm(dequantize(q) - w) / max(float(np.linalg.norm(w)), 1e-30))
        self._fresh_bits[name] = bits
        return _Part(q, False, kind)

    def worst(self, count: int = 3) -> list[str]:
        """The freshly rounded weights that lost the most, as 'name (Q6_K re-rounded to int4 block 32, 9.1% RMS error)'."""
        ranked = sorted(self.errors.items(), key=lambda item: -item[1])[:count]
        worst = []
        for name, err in ranked:
            kind = self._types.get(name, "float")
            verb = "rounded" if kind in FLOAT_TYPES else "re-rounded"
            worst.append(f"{name} ({kind} {verb} to int{self._fresh_bits[name]} block {self.quant.block_size}, {err:.1%} RMS error)")
        return worst

    def reblocked(self) -> list[str]:
        """The types read in another block than their own, as 'Q6_K re-rounded to int8 block 64 (0.63% RMS error at most)'."""
        return [f"{kind} re-rounded to int8 block {TYPES[kind].read_block} ({err:.2%} RMS error at most)"
                for kind, err in sorted(self._reblock_errors.items())]

    def notes(self) -> list[str]:
        """One line per (what was done, source type): the form it took and the bits a weight it reads."""
        lines = []
        for (imported, kind, bits, block, offsets), t in sorted(self._done.items(), key=lambda kv: kv[0][1:]):
            tensors = f"{t.tensors} {kind} tensor{'s' if t.tensors > 1 else ''}"
            if imported and kind in self._reblock_errors:
                line = (f"imported {tensors} as int{bits} MatMulNBits block {block}, values re-rounded "
                        f"({self._reblock_errors[kind]:.2%} RMS error at most)")
            elif imported:
                line = f"imported {tensors} exactly as int{bits} MatMulNBits block {block}"
                line += " plus per-block offsets" if offsets else ""
            else:
                verb = "quantized" if kind in FLOAT_TYPES else "re-quantized"
                sym = "symmetric" if self.quant.symmetric else "asymmetric"
                line = f"{verb} {tensors} to int{bits} block {block} {sym}"
            line += f": {t.read_bytes * 8 / t.weights:.2f} bits a weight read"
            stored = _stored_bits(kind)
            if stored is not None:
                line += f" ({stored:.2f} in the GGUF)"
            lines.append(line)
        return lines


def _stored_bits(kind: str) -> float | None:
    """Bits a weight a GGUF type takes in its file; None for HF sources."""
    try:
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    except KeyError:
        return None
    return nbytes * 8 / block

"""KV caches: the per-layer key/value state a graph reads and extends every step.

One small protocol, one cache per layout of graph (`Graph.layout`; `cache_for` picks it).
"static": a fast graph (GroupQueryAttention) takes a preallocated [1, kv_heads, capacity,
head_dim] buffer and writes new rows into it in place when past and present are the same
OrtValue, so a token never copies the cache (`StaticCache`); exported with a batch
dimension it decodes several `SlotCache` slots in one step. "dynamic": a generic graph
(optimum) returns a grown copy every step (`DynamicCache`). "append": a `--target openvino`
graph (standard-op attention) reads a sequence-major past and returns only the new rows,
which `AppendCache` binds right after the cached ones. "fixed": a `--target qnn` graph reads
the whole buffer of a context fixed at export every step (`FixedCache`).

Who may reuse a cache's rows (`Scope`, `visible`, `SharedPrefixes`) lives here too.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import GenerationError
from .bundle import KV_DTYPES, LAYOUTS, Graph
from .model_spec import ModelSpec

# int8: GroupQueryAttention quantizes new rows itself, with per-channel scales baked into the graph.
_DTYPES = dict(zip(KV_DTYPES, (np.float32, np.float16, np.int8)))


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def kv_shape(target: str, rows: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """One layer's batch-1 key (or value) shape for `rows` rows in a graph of `target`'s layout."""
    sequence_major = LAYOUTS[target] in ("append", "fixed")
    return (1, rows, kv_heads, head_dim) if sequence_major else (1, kv_heads, rows, head_dim)


def cache_for(graph: Graph, spec: ModelSpec, capacity: int) -> "KVCache":
    """The batch-1 cache that binds `graph` (its layout and kv_dtype decide), `capacity` rows."""
    kind = {"dynamic": DynamicCache, "static": StaticCache, "append": AppendCache, "fixed": FixedCache}
    if graph.layout not in kind:
        raise GenerationError(f"a {graph.kind} graph has no KV cache")
    return kind[graph.layout](spec.num_layers, spec.num_kv_heads, spec.head_dim, capacity, graph.kv_dtype)


def kv_dtype(name: str) -> np.dtype:
    """The numpy dtype of a manifest's `graph.kv_dtype`."""
    try:
        return np.dtype(_DTYPES[name])
    except KeyError:
        raise GenerationError(f"graph.kv_dtype {name!r}: expected one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class Snapshot:
    """The first `length` rows of every layer's keys and values, owned copies."""

    length: int
    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]


class KVCache(Protocol):
    """What the forward pass needs from a cache; `length` rows are valid."""

    num_layers: int
    length: int
    capacity: int

    def bind(self, io: ort.IOBinding, new_tokens: int) -> None:
        """Bind past inputs and present outputs for a step that feeds `new_tokens`."""
        ...

    def advance(self, n: int) -> None:
        """Account for the `n` rows the step just wrote."""
        ...

    def rewind(self, to: int) -> None:
        """Forget every row from `to` on."""
        ...

    def trim(self, n: int) -> int:
        """Forget the last `n` rows; return how many were dropped."""
        ...

    def snapshot(self, prefix_len: int) -> Snapshot: ...

    def restore(self, snap: Snapshot) -> None: ...


class _Base:
    _seq_axis = 2  # [batch, kv_heads, rows, head_dim]

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: str) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.capacity = capacity
        self.dtype = kv_dtype(dtype)
        self.length = 0

    keys: list[np.ndarray]
    values: list[np.ndarray]

    def _check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.capacity:
            raise GenerationError(
                f"KV cache holds {self.length} of {self.capacity} tokens; cannot add {new_tokens}"
            )

    def trim(self, n: int) -> int:
        n = min(max(n, 0), self.length)
        self.rewind(self.length - n)
        return n

    def _check_rewind(self, to: int) -> None:
        if not 0 <= to <= self.length:
            raise GenerationError(f"cannot rewind KV cache of length {self.length} to {to}")

    def _rows(self, buffer: np.ndarray, n: int) -> np.ndarray:
        """The first `n` rows of a layer's buffer (a view)."""
        return buffer[(slice(None),) * self._seq_axis + (slice(0, n),)]

    def snapshot(self, prefix_len: int) -> Snapshot:
        self._check_rewind(prefix_len)
        return Snapshot(
            prefix_len,
            tuple(self._rows(k, prefix_len).copy() for k in self.keys),
            tuple(self._rows(v, prefix_len).copy() for v in self.values),
        )


class _Preallocated(_Base):
    """Buffers of the whole capacity, written in place: rewinding is just moving `length`."""

    def advance(self, n: int) -> None:
        self.length += n

    def rewind(self, to: int) -> None:
        self._check_rewind(to)
        self.length = to

    def restore(self, snap: Snapshot) -> None:
        if snap.length > self.capacity:
            raise GenerationError(f"snapshot of {snap.length} tokens exceeds KV capacity {self.capacity}")
        for dst, src in zip(self.keys + self.values, snap.keys + snap.values):
            self._rows(dst, snap.length)[...] = src
        self.length = snap.length


def _lazy_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros in a private anonymous mapping: resident only where written."""
    count = int(np.prod(shape))
    size = max(count * dtype.itemsize, 1)
    private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # Windows has no flags
    return np.frombuffer(mmap.mmap(-1, size, **private), dtype, count).reshape(shape)


class StaticCache(_Preallocated):
    """Fixed buffers shared by past and present: rewinding is just moving `length`.

    Rows past `length` are stale but harmless: the graph attends only to the first
    `attention_mask`-many rows and overwrites the next ones. Preallocating the whole
    context costs memory only for the rows written: the buffers are anonymous memory
    maps, whose pages the OS provides on first write, so a 4096-token buffer holding
    64 tokens is resident for about 64 (measured: SmolLM2 at 64 tokens peaks at 291 MB
    either way, and growing the buffers instead raised the 2,000-token peak from 386 to
    514 MB, old and new copies living side by side). np.zeros is lazy only while malloc
    hands out fresh mappings; in a process that has freed memory it may zero recycled
    heap, all of it resident.
    """

    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: str = "float32",
        *, buffers: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
    ) -> None:
        """`buffers`: per-layer [1, kv_heads, capacity, head_dim] keys and values to use
        (a slot's rows of a `SlotCache`) instead of buffers of its own."""
        super().__init__(num_layers, kv_heads, head_dim, capacity, dtype)
        if buffers is None:
            shape = (1, kv_heads, capacity, head_dim)
            buffers = ([_lazy_zeros(shape, self.dtype) for _ in range(num_layers)],
                       [_lazy_zeros(shape, self.dtype) for _ in range(num_layers)])
        self.keys, self.values = buffers
        # OrtValues over the numpy buffers (no copy): bound once as both past and present.
        self._ort = [
            (ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v))
            for k, v in zip(self.keys, self.values)
        ]
        self._bound_to: ort.IOBinding | None = None

    def bind(self, io: ort.IOBinding, new_tokens: int) -> None:
        self._check_room(new_tokens)
        if self._bound_to is io:
            return
        for layer, (k, v) in enumerate(self._ort):
            for name, value in zip(past_names(layer), (k, v)):
                io.bind_ortvalue_input(name, value)
            for name, value in zip(present_names(layer), (k, v)):
                io.bind_ortvalue_output(name, value)
        self._bound_to = io


class AppendCache(_Preallocated):
    """Sequence-major buffers [1, capacity, kv_heads, head_dim] for a graph whose present is
    only the new rows: past is bound to the first `length` rows and present to the rows right
    after them, both views of the same buffer, so the graph writes the new rows in place.

    Rows are contiguous along the sequence here, so each view is one pointer and a shape:
    a step rebinds 4 per layer by address (no OrtValue made), and never copies the cache.
    Buffers are anonymous maps, resident only where written (see StaticCache).
    """

    _seq_axis = 1

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: str = "float32") -> None:
        super().__init__(num_layers, kv_heads, head_dim, capacity, dtype)
        shape = (1, capacity, kv_heads, head_dim)
        self.keys = [_lazy_zeros(shape, self.dtype) for _ in range(num_layers)]
        self.values = [_lazy_zeros(shape, self.dtype) for _ in range(num_layers)]
        self._row_bytes = kv_heads * head_dim * self.dtype.itemsize
        # (name, base address) of every past input and present output, in binding order.
        self._past = [(name, buf.ctypes.data) for layer in range(num_layers)
                      for name, buf in zip(past_names(layer), (self.keys[layer], self.values[layer]))]
        self._present = [(name, buf.ctypes.data) for layer in range(num_layers)
                         for name, buf in zip(present_names(layer), (self.keys[layer], self.values[layer]))]

    def bind(self, io: ort.IOBinding, new_tokens: int) -> None:
        self._check_room(new_tokens)
        past = [1, self.length, self.kv_heads, self.head_dim]
        present = [1, new_tokens, self.kv_heads, self.head_dim]
        offset = self.length * self._row_bytes
        for name, address in self._past:
            io.bind_input(name, "cpu", 0, self.dtype, past, address)
        for name, address in self._present:
            io.bind_output(name, "cpu", 0, self.dtype, present, address + offset)


class FixedCache(AppendCache):
    """Sequence-major buffers [1, capacity, kv_heads, head_dim] for a `--target qnn` graph.

    An NPU compiles a graph for fixed shapes, so that graph (export/qnn.py) reads the WHOLE
    preallocated cache every step, finds the rows it may attend to from `position_ids`, and
    returns only the new row. Past is bound to each whole buffer and present to row `length`
    of that same buffer: the graph reads that row only under its mask (weight exactly 0, and
    whatever it holds is a finite key or value), so writing it in place is safe in any order
    and no step copies the cache."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: str = "float32") -> None:
        super().__init__(num_layers, kv_heads, head_dim, capacity, dtype)
        self._row_size = kv_heads * head_dim * self.dtype.itemsize
        # (past name, present name, buffer address) per layer and kind.
        self._buffers = [(past, present, buf.ctypes.data) for layer in range(num_layers)
                         for past, present, buf in zip(past_names(layer), present_names(layer),
                                                       (self.keys[layer], self.values[layer]))]
        self._bound_to: ort.IOBinding | None = None

    def bind(self, io: ort.IOBinding, new_tokens: int) -> None:
        if new_tokens != 1:
            raise GenerationError(f"a fixed-context graph takes one token a step, not {new_tokens}")
        self._check_room(1)
        row = [1, 1, self.kv_heads, self.head_dim]
        if self._bound_to is not io:  # the whole buffers: the same every step
            whole = [1, self.capacity, self.kv_heads, self.head_dim]
            for past, _, address in self._buffers:
                io.bind_input(past, "cpu", 0, self.dtype, whole, address)
            self._bound_to = io
        offset = self.length * self._row_size
        for _, present, address in self._buffers:
            io.bind_output(present, "cpu", 0, self.dtype, row, address + offset)


def common_prefix(cached: Sequence[int], ids: Sequence[int], limit: int) -> int:
    """How many leading ids `cached` and `ids` share, at most `limit`."""
    n, limit = 0, min(limit, len(cached), len(ids))
    while n < limit and cached[n] == ids[n]:
        n += 1
    return n


def reusable_prefix(cached: Sequence[int], ids: Sequence[int]) -> int:
    """How many cached rows a prompt `ids` may keep: the common prefix, leaving at least two
    ids to feed (one where `ids` has one).

    The next logits come from the last fed id, and int4 MatMulNBits computes a run of one
    row differently from a run of several (logits apart by up to 1 on SmolLM2), so the
    prompt's last logits always come from a run of at least two, cached or cold
    (`session.prefill` keeps its last chunk that wide): a seeded request answers the same
    whatever the cache held before."""
    return common_prefix(cached, ids, len(ids) - 2)


class Scope(NamedTuple):
    """Who may reuse a cache's rows in place: the tenant whose request wrote them (an HTTP key or
    address, an MQTT reply topic; "" for the Python API's one user) and that request's
    `cache_salt`. Rows another scope wrote are invisible (`visible`), so what a request finds
    cached, in its usage and in its time to first token, never depends on another tenant's prompt."""

    tenant: str = ""
    salt: str | None = None


def visible(cached: Sequence[int], owner: Scope, scope: Scope) -> Sequence[int]:
    """The cached ids a request in `scope` may reuse in place: all of them when `owner`, the scope
    that wrote them, is its own, else none. A prefix the operator declared shared comes back
    from its own copy instead (`SharedPrefixes`), whoever wrote the rows it would replace.

    This is the one rule of prefix privacy: a single slot's reuse, the slot a batched request
    takes and the slot it copies a longer prefix from all ask it."""
    return cached if owner == scope else ()


@dataclass(frozen=True)
class SharedPrefix:
    """Token ids the operator declared shared between tenants, and the rows they make."""

    ids: tuple[int, ...]
    rows: Snapshot


class SharedPrefixes:
    """The prefixes declared shared (a service's system prompt, a recipe's), each with an owned
    copy of its rows: a request that starts with one restores it, a memory copy instead of its
    prefill, whatever tenant the cache served before. Restoring whenever the cache's own rows
    are not visible (not only when they differ) keeps the time a request takes independent of
    whether another tenant's prompt started the same way."""

    def __init__(self) -> None:
        self._prefixes: list[SharedPrefix] = []

    def __len__(self) -> int:
        return len(self._prefixes)

    def add(self, ids: Sequence[int], rows: Snapshot) -> None:
        if rows.length != len(ids):
            raise GenerationError(f"a shared prefix of {len(ids)} ids needs as many rows, got {rows.length}")
        self._prefixes.append(SharedPrefix(tuple(int(t) for t in ids), rows))

    def longest(self, ids: Sequence[int]) -> SharedPrefix | None:
        """The longest declared prefix `ids` starts with and may keep (`reusable_prefix`), or None."""
        limit = len(ids) - 2
        fits = [p for p in self._prefixes if len(p.ids) <= limit and common_prefix(p.ids, ids, limit) == len(p.ids)]
        return max(fits, key=lambda p: len(p.ids), default=None)


class SlotCache:
    """N static caches in one set of [N, kv_heads, capacity, head_dim] buffers per layer.

    Slot i is a batch-1 `StaticCache` over row i (a view, no copy), so a request's
    prefill runs on its slot alone; a batched step binds a contiguous range of rows and
    decodes one token for each. The buffers are anonymous maps like StaticCache's: a
    slot costs memory only for the rows written into it.
    """

    def __init__(
        self, slots: int, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: str = "float32"
    ) -> None:
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise GenerationError(f"slots must be an integer >= 1, got {slots!r}")
        self.num_layers = num_layers
        self.capacity = capacity
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [_lazy_zeros(shape, kv_dtype(dtype)) for _ in range(num_layers)]
        self.values = [_lazy_zeros(shape, kv_dtype(dtype)) for _ in range(num_layers)]
        self.slots = [
            StaticCache(num_layers, kv_heads, head_dim, capacity, dtype,
                        buffers=([k[i : i + 1] for k in self.keys], [v[i : i + 1] for v in self.values]))
            for i in range(slots)
        ]

    def __len__(self) -> int:
        return len(self.slots)

    def copy_rows(self, src: int, dst: int, start: int, stop: int) -> None:
        """Copy rows start..stop-1 of slot `src` into slot `dst`, every layer: a prefix another
        slot holds costs a memory copy instead of a prefill."""
        for buffer in self.keys + self.values:
            buffer[dst, :, start:stop] = buffer[src, :, start:stop]

    def bind(self, io: ort.IOBinding, lo: int, hi: int) -> None:
        """Bind slots lo..hi-1 as one batch's past inputs and present outputs."""
        for layer in range(self.num_layers):
            for past, present, buffer in zip(past_names(layer), present_names(layer),
                                             (self.keys[layer], self.values[layer])):
                value = ort.OrtValue.ortvalue_from_numpy(buffer[lo:hi])
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)


def pick_slot(cached: Sequence[Sequence[int]], ids: Sequence[int], candidates: Sequence[int]) -> int:
    """The slot among `candidates` (least recently used first) whose cached ids (those the
    request may see: `visible`) share the longest prefix with `ids`; with none shared, the
    first candidate (an empty or the least recently used slot), counting only the rows `ids`
    may keep (`reusable_prefix`)."""
    if not candidates:
        raise GenerationError("no free cache slot to pick from")
    # max keeps the first of equals: the least recently used.
    return max(candidates, key=lambda s: reusable_prefix(cached[s], ids))


class DynamicCache(_Base):
    """Growing arrays for graphs whose present is past plus the new rows (optimum exports)."""

    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: str = "float32"
    ) -> None:
        super().__init__(num_layers, kv_heads, head_dim, capacity, dtype)
        self.keys = [self._empty(0) for _ in range(num_layers)]
        self.values = [self._empty(0) for _ in range(num_layers)]
        self._next: tuple[list[np.ndarray], list[np.ndarray]] | None = None

    def _empty(self, rows: int) -> np.ndarray:
        return np.zeros((1, self.kv_heads, rows, self.head_dim), self.dtype)

    def bind(self, io: ort.IOBinding, new_tokens: int) -> None:
        self._check_room(new_tokens)
        rows = self.length + new_tokens
        # The graph writes each present into a buffer we own, so it becomes the next
        # past without another copy.
        nk = [np.empty((1, self.kv_heads, rows, self.head_dim), self.dtype) for _ in self.keys]
        nv = [np.empty((1, self.kv_heads, rows, self.head_dim), self.dtype) for _ in self.values]
        for layer in range(self.num_layers):
            pk, pv = past_names(layer)
            io.bind_ortvalue_input(pk, ort.OrtValue.ortvalue_from_numpy(self.keys[layer]))
            io.bind_ortvalue_input(pv, ort.OrtValue.ortvalue_from_numpy(self.values[layer]))
            ok, ov = present_names(layer)
            io.bind_ortvalue_output(ok, ort.OrtValue.ortvalue_from_numpy(nk[layer]))
            io.bind_ortvalue_output(ov, ort.OrtValue.ortvalue_from_numpy(nv[layer]))
        self._next = (nk, nv)

    def advance(self, n: int) -> None:
        if self._next is None or self._next[0][0].shape[2] != self.length + n:
            raise GenerationError(f"KV cache advanced by {n} without a matching bind")
        self.keys, self.values = self._next
        self._next = None
        self.length += n

    def rewind(self, to: int) -> None:
        self._check_rewind(to)
        if to == self.length:
            return
        # A slice along the sequence axis is not contiguous; the graph needs it to be.
        self.keys = [np.ascontiguousarray(k[:, :, :to]) for k in self.keys]
        self.values = [np.ascontiguousarray(v[:, :, :to]) for v in self.values]
        self.length = to

    def restore(self, snap: Snapshot) -> None:
        if snap.length > self.capacity:
            raise GenerationError(f"snapshot of {snap.length} tokens exceeds KV capacity {self.capacity}")
        self.keys = [k.copy() for k in snap.keys]
        self.values = [v.copy() for v in snap.values]
        self._next = None
        self.length = snap.length

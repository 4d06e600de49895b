"""The runtime side of a `--target qnn` graph: one token a step over a context fixed at export.

An NPU compiles a graph for fixed shapes, so that graph (export/qnn.py) reads the WHOLE
preallocated cache every step, finds the rows it may attend to from `position_ids`, and
returns only the new row. `FixedCache` binds past to the whole buffer and present to
row `position` of that same buffer: the graph reads that row only under its mask (weight
exactly 0, and whatever it holds is a finite key or value), so writing it in place is
safe in any order and no step copies the cache. `StepRunner` has the Runner's interface;
a prompt and a draft to verify are fed one token a step (there is no prefill graph yet).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..errors import BundleError, GenerationError
from .caches import AppendCache, past_names, present_names
from .runner import Runner, run_bound

POSITION = "position_ids"


class FixedCache(AppendCache):
    """Sequence-major buffers [1, capacity, kv_heads, head_dim]; past is each whole buffer,
    present the row at `length` (see the module docstring)."""

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


class StepRunner(Runner):
    """A Runner over a one-token graph: every id, prompt or draft, is one step. It keeps
    Runner's bookkeeping of the cached ids (tokens, length, capacity, reuse, rewind)."""

    def __init__(self, session: ort.InferenceSession, cache: FixedCache | None = None, *, kind: str = "fast",
                 where: str = "graph") -> None:
        # Not Runner.__init__: that binds the dynamic graph's attention_mask and logits_to_keep.
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        layers = sum(name.startswith("past_key_values.") for name in inputs) // 2
        wanted = {"input_ids", POSITION} | {name for layer in range(layers) for name in past_names(layer)}
        if kind != "fast" or set(inputs) != wanted or layers == 0:
            odd = sorted(set(inputs) ^ wanted) or ["past_key_values.0.key"]
            raise BundleError(f"{where}: graph input {odd[0]!r}: not the one-token graph of --target qnn "
                              "(input_ids, position_ids and past_key_values.* only)")
        shape = inputs[past_names(0)[0]].shape
        logits = outputs.get("logits")
        if logits is None or not all(isinstance(n, int) for n in [*shape, *logits.shape]):
            raise BundleError(f"{where}: a --target qnn graph has static 'logits' and past shapes, got "
                              f"{None if logits is None else logits.shape} and {shape}")
        _, context, kv_heads, head_dim = shape
        self.cache = cache if cache is not None else FixedCache(layers, kv_heads, head_dim, context)
        if not isinstance(self.cache, FixedCache) or self.cache.capacity != context:
            raise BundleError(f"{where}: the graph's context is {context} rows, fixed at export; "
                              f"{type(self.cache).__name__} of {self.cache.capacity} does not bind it")
        self.session = session
        self.kind = kind
        self.vocab_size = logits.shape[-1]
        self.tokens: list[int] = []
        self._where = where
        self._io = session.io_binding()
        # Bound once; a step writes the token and its position into them.
        self._id, self._position = np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int32)
        self._row = np.zeros((1, 1, self.vocab_size), np.float32)
        self._held = [ort.OrtValue.ortvalue_from_numpy(a) for a in (self._id, self._position, self._row)]
        self._io.bind_ortvalue_input("input_ids", self._held[0])
        self._io.bind_ortvalue_input(POSITION, self._held[1])
        self._io.bind_ortvalue_output("logits", self._held[2])

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Feed `ids` after the cached ones; return the last position's logits (float32, a copy)."""
        return self.forward_all(ids)[-1]

    def forward_all(self, ids: Sequence[int]) -> np.ndarray:
        """Feed `ids` one step each; every fed position's logits, `(len(ids), vocab)`."""
        if not ids:
            raise GenerationError("forward needs at least one token id")
        if self.length + len(ids) > self.capacity:
            raise GenerationError(f"KV cache holds {self.length} of {self.capacity} tokens (the context this "
                                  f"graph was exported for, --context); cannot add {len(ids)}")
        rows = np.empty((len(ids), self.vocab_size), np.float32)
        for i, token in enumerate(ids):
            self.cache.bind(self._io, 1)
            self._id[0, 0] = token
            self._position[0, 0] = self.length
            run_bound(self.session, self._io, self._where)
            self.cache.advance(1)
            self.tokens.append(int(token))
            rows[i] = self._row[0, 0]
        return rows

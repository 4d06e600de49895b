"""The forward pass over a bundle's graph: the runners that feed it token ids and keep its cache.

Where a graph gets its runner: `open_runner` (one request: `Runner` for fast and generic
graphs, `OneTokenRunner` for a fixed-context qnn graph) and `open_slots` (`BatchRunner` over
cache slots), from the manifest's `Graph` alone.

Per-step overhead is what separates a Python loop from a native one, so the
forward pass binds everything once and afterwards rebinds only the inputs whose
shape changed (the attention mask grows by one each token) and copies only the
last row of logits out of the graph.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import BundleError, GenerationError
from .bundle import Graph
from .caches import (AppendCache, FixedCache, KVCache, Scope, SharedPrefixes, SlotCache, cache_for, past_names,
                     reusable_prefix, visible)
from .model_spec import ModelSpec
from .providers import first_line
from .residency import MappedWeights

POSITION = "position_ids"  # a one-token graph finds its rows from the position it is fed
_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


# Prefill feeds at most this many tokens per run. The attention scratch grows with
# chunk x context and the session's arena keeps its peak. SmolLM2, 2,000-token prompt,
# peak RSS / time to first token: 256: 294 MiB / 5.9 s, 128: 280 / 6.2 s, 64: 274 /
# 6.2 s, 32: 268 / 6.5 s; at 226 tokens 64 is as fast as 128 (336 vs 341 ms), 32 is 5% slower.
PREFILL_CHUNK = 64


def piece(pending: Sequence[int], budget: int = PREFILL_CHUNK) -> int:
    """How many of `pending` prompt ids to feed in one run: at most `budget` and PREFILL_CHUNK,
    at least two, and never leaving exactly one behind, so a prompt's last logits come from a
    several-row run however it is cut (int4 rounds a one-row step differently: `Runner.reuse`)."""
    n = min(len(pending), max(budget, 2), PREFILL_CHUNK)
    if len(pending) - n == 1:
        n = n - 1 if n > 2 else len(pending)
    return n


def prefill(forward: Callable[[Sequence[int]], np.ndarray], fresh: Sequence[int]) -> np.ndarray:
    """Feed `fresh` (the prompt's tail not yet cached) in pieces; the logits after its last token."""
    # One 2,000-token pass would hold ~150 MB (see PREFILL_CHUNK).
    start = 0
    while start < len(fresh):
        n = piece(fresh[start:])
        logits = forward(fresh[start : start + n])
        start += n
    return logits



def run_bound(session: ort.InferenceSession, io: ort.IOBinding, where: str) -> None:
    """One run over `io`'s bindings; onnxruntime's failure as a GenerationError naming `where`."""
    MappedWeights.tick()
    try:
        session.run_with_iobinding(io)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise GenerationError(f"{where}: onnxruntime run failed ({first_line(exc)})") from None


class CachedIds:
    """What every batch-1 runner keeps beside its cache: `tokens`, the ids whose keys and values
    the cache holds, so a new prompt can reuse the longest common prefix, and `scope`, whose
    they are (`caches.visible`)."""

    def __init__(self, session: ort.InferenceSession, cache: KVCache, where: str) -> None:
        self.session = session
        self.cache = cache
        self.tokens: list[int] = []
        self.scope = Scope()  # nobody's until a request takes the cache (`reuse`)
        self._where = where

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def reuse(self, ids: Sequence[int], scope: Scope = Scope(), shared: SharedPrefixes | None = None) -> int:
        """Keep the cached rows a request in `scope` may reuse for `ids` (`caches.visible`,
        `caches.reusable_prefix`), or restore the longest of the `shared` prefixes `ids`
        starts with where that is more; return how many rows `ids` finds cached."""
        n = reusable_prefix(visible(self.tokens, self.scope, scope), ids)
        prefix = shared.longest(ids) if shared else None
        if prefix is not None and len(prefix.ids) > n:
            self.cache.restore(prefix.rows)
            self.tokens[:] = prefix.ids
            n = len(prefix.ids)
        else:
            self.rewind(n)
        self.scope = scope
        return n

    def rewind(self, to: int) -> None:
        self.cache.rewind(to)
        del self.tokens[to:]


class Runner(CachedIds):
    """Feeds token ids through a fast or generic graph and keeps the KV cache and its ids in
    step; a prompt's run of ids is one step (`prefill` chunks it)."""

    def __init__(self, session: ort.InferenceSession, cache: KVCache, *, kind: str, where: str = "graph") -> None:
        super().__init__(session, cache, where)
        self.kind = kind
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        past = {name for layer in range(cache.num_layers) for name in past_names(layer)}
        required = {"input_ids", "attention_mask"} | past | ({"logits_to_keep"} if kind == "fast" else set())
        optional = {"position_ids"} if kind == "generic" else set()
        if missing := sorted(required - inputs):
            raise BundleError(f"{where}: graph input {missing[0]!r} is missing ({kind} graph)")
        if unknown := sorted(inputs - required - optional):
            raise BundleError(f"{where}: graph input {unknown[0]!r} is not one edgellm feeds ({kind} graph)")
        if "logits" not in outputs:
            raise BundleError(f"{where}: graph output 'logits' is missing")
        if kind == "fast" and sequence_major(session) != isinstance(cache, AppendCache):
            layout = "sequence-major (--target openvino)" if sequence_major(session) else "head-major"
            raise BundleError(f"{where}: the graph's KV cache is {layout}; {type(cache).__name__} does not bind it "
                              "(caches.cache_for picks the cache from the manifest's graph section)")
        logits_type = outputs["logits"].type
        if logits_type not in _NUMPY:
            raise BundleError(f"{where}: graph output 'logits' has type {logits_type}, expected float or float16")
        vocab = outputs["logits"].shape[-1]
        if not isinstance(vocab, int):
            raise BundleError(f"{where}: graph output 'logits' has no fixed vocabulary dimension")
        self.vocab_size = vocab
        self._logits_dtype = _NUMPY[logits_type]
        self._positions = "position_ids" in inputs
        capacity = cache.capacity
        self._io = session.io_binding()
        # Buffers that live as long as the runner; OrtValues over them share memory,
        # so writing a token id into `_one` is the whole per-step input update.
        self._mask = np.ones((1, capacity), np.int64)
        self._arange = np.arange(capacity, dtype=np.int64)[None]
        self._one = np.zeros((1, 1), np.int64)
        self._one_ort = ort.OrtValue.ortvalue_from_numpy(self._one)
        self._row = np.zeros((1, 1, vocab), self._logits_dtype)
        self._row_ort = ort.OrtValue.ortvalue_from_numpy(self._row)
        self._held: dict[str, ort.OrtValue] = {}
        # Only the last position's logits are computed unless a caller verifies a draft.
        self._keep_one = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64))
        if kind == "fast":
            self._bind_held("logits_to_keep", self._keep_one)
        self._bind_output_row()

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Feed `ids` after the cached ones; return the last position's logits (float32, a copy)."""
        return self._run(ids, 1)[-1]

    def forward_all(self, ids: Sequence[int]) -> np.ndarray:
        """Feed `ids` after the cached ones; return every fed position's logits (float32,
        `(len(ids), vocab)`), so a run of drafted tokens is verified in one step."""
        return self._run(ids, len(ids))

    def _run(self, ids: Sequence[int], keep: int) -> np.ndarray:
        n = len(ids)
        if n == 0:
            raise GenerationError("forward needs at least one token id")
        start = self.cache.length
        self.cache.bind(self._io, n)
        if n == 1:
            self._one[0, 0] = ids[0]
            self._bind_held("input_ids", self._one_ort)
        else:
            self._bind_input("input_ids", np.asarray(ids, dtype=np.int64)[None])
        self._bind_input("attention_mask", self._mask[:, : start + n])
        if self._positions:
            self._bind_input("position_ids", self._arange[:, start : start + n])
        if keep == 1 and (self.kind == "fast" or n == 1):
            logits = self._row
            self._bind_output_row()
            if self.kind == "fast":
                self._bind_held("logits_to_keep", self._keep_one)
        else:
            # A generic graph returns logits for every fed position; a fast one the last `keep`.
            logits = np.empty((1, n if self.kind == "generic" else keep, self.vocab_size), self._logits_dtype)
            self._bind_output("logits", logits)
            if self.kind == "fast":
                self._bind_input("logits_to_keep", np.array([keep], np.int64))
        run_bound(self.session, self._io, self._where)
        self.cache.advance(n)
        self.tokens.extend(int(t) for t in ids)
        return logits[0, -keep:].astype(np.float32)

    def _bind_input(self, name: str, array: np.ndarray) -> None:
        self._bind_held(name, ort.OrtValue.ortvalue_from_numpy(array))

    def _bind_held(self, name: str, value: ort.OrtValue) -> None:
        if self._held.get(name) is value:
            return
        self._io.bind_ortvalue_input(name, value)
        # The binding points at the array's memory: keep it alive until rebound.
        self._held[name] = value

    def _bind_output(self, name: str, array: np.ndarray) -> None:
        value = ort.OrtValue.ortvalue_from_numpy(array)
        self._io.bind_ortvalue_output(name, value)
        self._held[f"out:{name}"] = value

    def _bind_output_row(self) -> None:
        if self._held.get("out:logits") is self._row_ort:
            return
        self._io.bind_ortvalue_output("logits", self._row_ort)
        self._held["out:logits"] = self._row_ort


class OneTokenRunner(CachedIds):
    """The runner of a `--target qnn` graph: one token a step over a context fixed at export
    (caches.FixedCache), so every id, prompt or draft, is one step; there is no prefill graph
    yet. It answers the calls a `Runner` answers and keeps the same cached ids."""

    def __init__(self, session: ort.InferenceSession, cache: FixedCache | None = None, *,
                 where: str = "graph") -> None:
        """`cache`: the graph's own shapes size one when it is None (the export's quality gate)."""
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        layers = sum(name.startswith("past_key_values.") for name in inputs) // 2
        wanted = {"input_ids", POSITION} | {name for layer in range(layers) for name in past_names(layer)}
        if set(inputs) != wanted or layers == 0:
            odd = sorted(set(inputs) ^ wanted) or ["past_key_values.0.key"]
            raise BundleError(f"{where}: graph input {odd[0]!r}: not the one-token graph of --target qnn "
                              "(input_ids, position_ids and past_key_values.* only)")
        shape = inputs[past_names(0)[0]].shape
        logits = outputs.get("logits")
        if logits is None or not all(isinstance(n, int) for n in [*shape, *logits.shape]):
            raise BundleError(f"{where}: a --target qnn graph has static 'logits' and past shapes, got "
                              f"{None if logits is None else logits.shape} and {shape}")
        _, context, kv_heads, head_dim = shape
        cache = cache if cache is not None else FixedCache(layers, kv_heads, head_dim, context)
        if not isinstance(cache, FixedCache) or cache.capacity != context:
            raise BundleError(f"{where}: the graph's context is {context} rows, fixed at export; "
                              f"{type(cache).__name__} of {cache.capacity} does not bind it")
        super().__init__(session, cache, where)
        self.cache: FixedCache = cache
        self.kind = "fast"
        self.vocab_size = logits.shape[-1]
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


def sequence_major(session: ort.InferenceSession) -> bool:
    """Whether the graph's past is [batch, rows, kv_heads, head_dim] (caches.AppendCache's layout)."""
    past = next(i for i in session.get_inputs() if i.name == past_names(0)[0])
    return isinstance(past.shape[1], str)


class BatchRunner:
    """Cache slots decoded together: a Runner per slot for its prefill (batch 1, chunked
    as a single request's), and one step that feeds one token to each of several slots.

    A step binds the contiguous range of slots from the lowest to the highest fed one.
    Slots in between that are not fed (idle, or between requests) ride along as
    padding rows: a dummy token written just past their cached rows, which is stale
    space, so their cached prefix survives for reuse.
    """

    def __init__(self, session: ort.InferenceSession, cache: SlotCache, *, where: str = "graph") -> None:
        if sequence_major(session):
            raise BundleError(f"{where}: a --target openvino graph decodes one request at a time (a step's new KV "
                              "rows land at one offset for every row); serve it with one slot, without cache slots")
        first = next(i for i in session.get_inputs() if i.name == "input_ids")
        if len(cache) > 1 and isinstance(first.shape[0], int):
            raise BundleError(f"{where}: graph input 'input_ids' has batch dimension {first.shape[0]}; "
                              f"{len(cache)} slots need a graph exported with a batch dimension")
        self.session = session
        self.cache = cache
        self.slots = [Runner(session, slot, kind="fast", where=where) for slot in cache.slots]
        self.vocab_size = self.slots[0].vocab_size
        self._where = where
        n = len(cache)
        # Rows lo..hi-1 of these are bound once per range with that range's KV views.
        self._ids = np.zeros((n, 1), np.int64)
        self._logits = np.zeros((n, 1, self.vocab_size), self.slots[0]._logits_dtype)
        self._keep = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64))
        self._bindings: dict[tuple[int, int], tuple[ort.IOBinding, list[ort.OrtValue]]] = {}
        self._mask: ort.OrtValue | None = None

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def reuse(self, slot: int, ids: Sequence[int], scope: Scope = Scope(),
              shared: SharedPrefixes | None = None) -> int:
        """Keep `slot`'s cached rows of its longest common prefix with `ids` (`Runner.reuse`) and
        extend them with rows another slot holds for a longer one (a chat's earlier turn), as far
        as `caches.reusable_prefix` allows and only from a slot whose rows `scope` may see
        (`caches.visible`). Return how many rows `ids` finds cached."""
        runner = self.slots[slot]
        kept = runner.reuse(ids, scope, shared)
        longest, donor = max((reusable_prefix(visible(other.tokens, other.scope, scope), ids), i)
                             for i, other in enumerate(self.slots))
        if longest > kept:
            self.cache.copy_rows(donor, slot, kept, longest)
            runner.cache.advance(longest - kept)
            runner.tokens.extend(int(t) for t in ids[kept:longest])
        return max(longest, kept)

    def _binding(self, lo: int, hi: int) -> ort.IOBinding:
        if (lo, hi) not in self._bindings:
            io = self.session.io_binding()
            self.cache.bind(io, lo, hi)
            held = [ort.OrtValue.ortvalue_from_numpy(self._ids[lo:hi]),
                    ort.OrtValue.ortvalue_from_numpy(self._logits[lo:hi])]
            io.bind_ortvalue_input("input_ids", held[0])
            io.bind_ortvalue_output("logits", held[1])
            io.bind_ortvalue_input("logits_to_keep", self._keep)
            self._bindings[lo, hi] = (io, held)
        return self._bindings[lo, hi][0]

    def step(self, feeds: dict[int, int]) -> dict[int, np.ndarray]:
        """Feed `feeds[slot]` after each slot's cached ids; each fed slot's next logits (float32)."""
        if not feeds:
            raise GenerationError("a batched step needs at least one slot to feed")
        lo, hi = min(feeds), max(feeds) + 1
        lengths = np.empty(hi - lo, np.int64)
        for slot in range(lo, hi):
            runner = self.slots[slot]
            if slot in feeds and runner.length >= runner.capacity:
                raise GenerationError(f"KV cache slot {slot} holds {runner.length} of {runner.capacity} tokens; "
                                      "cannot add 1")
            if slot not in feeds and runner.length >= runner.capacity:
                runner.rewind(runner.length - 1)  # a padding row needs a free row to write
            self._ids[slot, 0] = feeds.get(slot, 0)
            lengths[slot - lo] = runner.length
        io = self._binding(lo, hi)
        # Right-padded: row i attends to its own cached rows and the new one.
        mask = (np.arange(lengths.max() + 1)[None] <= lengths[:, None]).astype(np.int64)
        # The binding points at the mask's memory: keep it alive until rebound.
        self._mask = ort.OrtValue.ortvalue_from_numpy(mask)
        io.bind_ortvalue_input("attention_mask", self._mask)
        run_bound(self.session, io, self._where)
        out = {}
        for slot, token in feeds.items():
            runner = self.slots[slot]
            runner.cache.advance(1)
            runner.tokens.append(int(token))
            out[slot] = self._logits[slot, 0].astype(np.float32)
        return out


def open_runner(session: ort.InferenceSession, graph: Graph, spec: ModelSpec, context: int, *,
                where: str = "graph") -> Runner | OneTokenRunner:
    """The batch-1 runner and the cache that fit `graph`: where a bundle's graph is chosen a runner.
    `context`: the cache rows asked for; a graph whose shapes fix its own (qnn) keeps that."""
    check_names(session, graph, where)
    cache = cache_for(graph, spec, graph.fixed_context or context)
    if graph.layout == "fixed":
        return OneTokenRunner(session, cache, where=where)
    return Runner(session, cache, kind=graph.kind, where=where)


def check_names(session: ort.InferenceSession, graph: Graph, where: str) -> None:
    """Refuse a graph whose input or output names are not those its manifest lists: the
    description the runtime reads must be of the graph it runs."""
    for what, names, listed in (("input", [i.name for i in session.get_inputs()], graph.inputs),
                                ("output", [o.name for o in session.get_outputs()], graph.outputs)):
        if odd := sorted(set(names) ^ set(listed)):
            side = "the graph has it, manifest.json's" if odd[0] in names else "manifest.json lists it, the graph's"
            raise BundleError(f"{where}: graph {what} {odd[0]!r}: {side} graph.{what}s do not")


def open_slots(session: ort.InferenceSession, graph: Graph, spec: ModelSpec, context: int, slots: int, *,
               where: str = "graph") -> BatchRunner:
    """`slots` cache slots of `context` rows over `graph`, decoded together where it has a batch
    dimension (`Graph.batch`; without one, ask for one slot)."""
    if not graph.takes_slots:
        kind = "a generic" if graph.kind != "fast" else f"a --target {graph.target}"
        raise GenerationError(f"{kind} graph decodes one request at a time: serve it with one slot")
    cache = SlotCache(slots, spec.num_layers, spec.num_kv_heads, spec.head_dim, context, graph.kv_dtype)
    return BatchRunner(session, cache, where=where)

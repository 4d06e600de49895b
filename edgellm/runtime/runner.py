"""The onnxruntime session over a bundle's graph, and the forward pass that drives it.

Per-step overhead is what separates a Python loop from a native one, so the
forward pass binds everything once and afterwards rebinds only the inputs whose
shape changed (the attention mask grows by one each token) and copies only the
last row of logits out of the graph.
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import onnxruntime as ort

from ..errors import BundleError, GenerationError
from .caches import AppendCache, KVCache, Scope, SharedPrefixes, SlotCache, past_names, reusable_prefix, visible

log = logging.getLogger("edgellm")

CPU = "CPUExecutionProvider"
ProviderSpec = Union[str, tuple[str, dict[str, Any]]]

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0  # 0: onnxruntime picks one per core
    # One graph, one request at a time: parallelism between nodes only costs threads.
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Errors only: a provider that takes part of a graph warns per node it leaves to the
    # CPU, and edgellm says in one line which provider runs and why another did not.
    so.log_severity_level = 3
    return so


def _name(entry: ProviderSpec) -> str:
    return entry if isinstance(entry, str) else entry[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Accelerators shipped as plugin execution providers, loaded into the stock onnxruntime
# wheel: the provider's name -> (its Python package, the edgellm extra that installs it).
PLUGINS = {
    "OpenVINOExecutionProvider": ("onnxruntime_ep_openvino", "openvino"),
    "QNNExecutionProvider": ("onnxruntime_qnn", "qnn"),
}
# A plugin provider's device types, tried in this order unless its profile entry says
# `devices = "GPU,CPU"` (edgellm's own option; the rest go to the provider as they are).
DEVICE_ORDER = "NPU,GPU,CPU"
_registered: set[str] = set()


def create_session(
    path: str | os.PathLike[str],
    *,
    providers: Sequence[ProviderSpec] | None = None,
    threads: int | None = None,
) -> ort.InferenceSession:
    """Open `path` on the first provider that works, ending on the CPU.

    A board's profile may name an accelerator that this onnxruntime build lacks, whose
    plugin package is not installed, that has no device here, or that fails on this
    graph; the model should still run, slower, and say why in one line.
    """
    path = Path(path)
    available = set(ort.get_available_providers())
    cpu: ProviderSpec = CPU
    for entry in providers or ():
        name = _name(entry)
        if name == CPU:
            cpu = entry
            break
        if name in available and name not in _registered:
            session = _builtin_session(path, entry, threads)
        elif name in PLUGINS:
            session = _plugin_session(path, name, {} if isinstance(entry, str) else entry[1], threads)
        else:
            log.warning("provider %s is not available in this onnxruntime (has %s); trying the next",
                        name, ", ".join(sorted(available)))
            continue
        if session is not None:
            return session
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=[cpu])
    except Exception as exc:  # noqa: BLE001 - reported as the bundle's fault, in one line
        raise BundleError(f"{path}: onnxruntime cannot load the graph ({_first_line(exc)})") from None


def _builtin_session(path: Path, entry: ProviderSpec, threads: int | None) -> ort.InferenceSession | None:
    name = _name(entry)
    if not isinstance(entry, str):
        folder = str(Path(ort.__file__).parent / "capi")  # where onnxruntime's own provider wheels put libraries
        entry = (name, {k: str(v).replace("{package}", folder) for k, v in entry[1].items() if k != "devices"})
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=[entry, CPU])
    except Exception as exc:  # noqa: BLE001 - any failure means: try the next provider
        log.warning("provider %s failed to open %s (%s); trying the next", name, path.name, _first_line(exc))
        return None
    if name in session.get_providers():
        return session
    log.warning("provider %s was not applied to %s; trying the next", name, path.name)
    return None


def _plugin_session(path: Path, name: str, options: dict[str, Any],
                    threads: int | None) -> ort.InferenceSession | None:
    """`name` from its plugin package, on the first of its devices that opens the graph.

    Option values may say `{package}` for the folder of the provider's libraries (QNN's
    `backend_path = "{package}/libQnnHtp.so"`): the plugin package's here, onnxruntime's
    own for a built-in provider."""
    package, extra = PLUGINS[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        log.warning('provider %s is a plugin and its package %s is not installed (pip install "edgellm[%s]"); '
                    "trying the next", name, package, extra)
        return None
    if name not in _registered:
        try:
            ort.register_execution_provider_library(name, module.get_library_path())
        except Exception as exc:  # noqa: BLE001 - a broken plugin is one more provider to skip
            log.warning("provider %s: cannot register %s (%s); trying the next", name, package, _first_line(exc))
            return None
        _registered.add(name)
    options = {k: str(v) for k, v in options.items()}
    order = [kind.strip().upper() for kind in options.pop("devices", DEVICE_ORDER).split(",") if kind.strip()]
    folder = str(Path(module.__file__).parent)
    options = {k: v.replace("{package}", folder) for k, v in options.items()}
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:
        log.warning("provider %s offers no device on this machine; trying the next", name)
        return None
    for kind in order:
        chosen = [d for d in devices if d.device.type.name == kind]
        if not chosen:
            continue
        so = session_options(threads)
        try:
            so.add_provider_for_devices(chosen[:1], options)
            return ort.InferenceSession(str(path), so)
        except Exception as exc:  # noqa: BLE001 - try the next device
            log.warning("provider %s on its %s device failed to open %s (%s); trying the next", name, kind,
                        path.name, _first_line(exc))
    have = sorted({d.device.type.name for d in devices})
    log.warning("provider %s opened %s on none of its devices %s (has %s); trying the next", name, path.name,
                ",".join(order), ",".join(have))
    return None


def available_devices() -> list[tuple[str, str, str]]:
    """(provider, device type, vendor) for every provider this machine can run: onnxruntime's
    own and those of installed plugin packages (registered here). The device is "" for a
    built-in provider that does not enumerate devices and for a plugin that found none."""
    for name, (package, _) in PLUGINS.items():
        if name in _registered:
            continue
        try:
            module = importlib.import_module(package)
            ort.register_execution_provider_library(name, module.get_library_path())
            _registered.add(name)
        except Exception:  # noqa: BLE001 - not installed or broken: not available here
            continue
    found = [(d.ep_name, d.device.type.name, d.device.vendor) for d in ort.get_ep_devices()]
    listed = {name for name, _, _ in found}
    idle = [(name, "", "installed, no device here") for name in sorted(_registered - listed)]
    # Azure's provider calls a cloud endpoint: never a device of an offline board.
    return found + idle + [(p, "", "") for p in ort.get_available_providers()
                           if p not in listed and p != "AzureExecutionProvider"]


def release_freed_heap() -> None:
    """Return the heap that onnxruntime freed while loading to the operating system.

    Prepacking copies each MatMulNBits weight into the kernel's layout and frees the
    staging buffers; glibc keeps such memory (26 MB for SmolLM2) unless asked, and on
    a 1 GB board that is memory the KV cache could use.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows): nothing kept
        return
    trim(0)


_MADV_DONTNEED = 4


def release_mapped_weights(root: Path) -> int:
    """Drop this process's resident pages of the files under `root` that onnxruntime mapped.

    onnxruntime maps external weights and, having prepacked a MatMulNBits weight into a
    copy of its own, unmaps it, unless another node reads it too: a tied embedding shares
    lm_head's table, and on x86 the packed scales stay mapped. Prepacking read every page,
    so each would stay resident twice (Qwen2.5-0.5B shape: 147 MB). Dropped pages stay in
    the page cache and come back at the rows a Gather reads. A mapping with a page written
    through it (copied on write: dropping would lose the write) is left alone. Linux only.
    Returns the bytes dropped.
    """
    try:
        smaps = Path("/proc/self/smaps").read_text()
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    prefix, dropped, span = str(Path(root).resolve()) + os.sep, 0, None
    for line in smaps.splitlines():
        fields = line.split()
        if len(fields) >= 6 and "-" in fields[0] and fields[5].startswith(prefix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            span = (start, end)
        elif len(fields) >= 5 and "-" in fields[0]:
            span = None  # a mapping of something else
        elif span and fields[0] == "Anonymous:" and fields[1] == "0":  # no page written through it
            if madvise(span[0], span[1] - span[0], _MADV_DONTNEED) == 0:
                dropped += span[1] - span[0]
            span = None
    return dropped


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
    try:
        session.run_with_iobinding(io)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise GenerationError(f"{where}: onnxruntime run failed ({_first_line(exc)})") from None


class Runner:
    """Feeds token ids through the graph and keeps the KV cache and its ids in step.

    `tokens` are the ids whose keys and values the cache holds, so a new prompt can
    reuse the longest common prefix; `scope` is whose they are (`kvcache.visible`).
    """

    scope = Scope()  # an instance's own once a request took the cache (StepRunner has no __init__ of Runner's)

    def __init__(self, session: ort.InferenceSession, cache: KVCache, *, kind: str, where: str = "graph") -> None:
        self.session = session
        self.cache = cache
        self.kind = kind
        self.tokens: list[int] = []
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
                              "(kvcache.cache_for picks the cache from the manifest's graph section)")
        logits_type = outputs["logits"].type
        if logits_type not in _NUMPY:
            raise BundleError(f"{where}: graph output 'logits' has type {logits_type}, expected float or float16")
        vocab = outputs["logits"].shape[-1]
        if not isinstance(vocab, int):
            raise BundleError(f"{where}: graph output 'logits' has no fixed vocabulary dimension")
        self.vocab_size = vocab
        self._where = where
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

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def reuse(self, ids: Sequence[int], scope: Scope = Scope(), shared: SharedPrefixes | None = None) -> int:
        """Keep the cached rows a request in `scope` may reuse for `ids` (`kvcache.visible`,
        `kvcache.reusable_prefix`), or restore the longest of the `shared` prefixes `ids`
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


def sequence_major(session: ort.InferenceSession) -> bool:
    """Whether the graph's past is [batch, rows, kv_heads, head_dim] (kvcache.AppendCache's layout)."""
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
        as `kvcache.reusable_prefix` allows and only from a slot whose rows `scope` may see
        (`kvcache.visible`). Return how many rows `ids` finds cached."""
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

"""One model, one queue, one worker: every front (MQTT, HTTP) submits its requests here.

The model is not thread-safe, so one worker thread drives the model's decode loop
(`edgellm.scheduler`, over one slot or several) and hands each chunk to the job's
callbacks on that thread. Fronts only translate: they turn their requests into a `Job`
and the last chunk's `Result` into their replies. The queue is fair across clients
(`FairQueue`), so one flooding client takes only its own share.

A front checks its request once, on its own thread (`Engine.params`: the model's
`GenerationParams.build` with the service's token ceiling), and the `Job` carries that
frozen value: neither the grammar thread nor the worker checks it again.

A request held to a grammar (response_format, grammar, tools) or asking for retrieval
takes its place in the queue when submitted, but enters it only once a second thread has
prepared it: compiled its grammar, embedded its question and searched the index (`Model.ground`).
Each can take seconds (a grammar's compile; an embedding that waits its turn behind an
/v1/embeddings batch of 2,048 texts), which neither the thread that received the request (the
MQTT network loop, the HTTP event loop) nor the worker, between two tokens of every running
stream, can spare.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Mapping, Protocol, TypeVar

from .errors import GenerationError
from .params import GenerationParams
from .sequence import request_grammar
from .runtime.residency import release_freed_heap
from .text import cannot_fit

log = logging.getLogger("edgellm.engine")

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Waiting items, served round-robin across clients, bounded in total and per client.

    One device flooding requests fills only its own share: the others' requests keep
    their turn instead of waiting behind the whole flood.
    """

    def __init__(self, capacity: int, per_client: int) -> None:
        self.capacity = capacity
        self.per_client = per_client
        self._waiting: OrderedDict[Hashable, deque[T]] = OrderedDict()
        self._taken: Counter[Hashable] = Counter()  # each client's items and held places
        self._size = 0
        self._closed = False
        self._ready = threading.Condition()

    def __len__(self) -> int:
        return self._size

    def put(self, client: Hashable, item: T) -> str | None:
        """Queue `item`; the reason it was refused, or None."""
        refusal = self.hold(client)
        if refusal is None:
            self.fill(client, item)
        return refusal

    def hold(self, client: Hashable) -> str | None:
        """Hold a place for an item of `client` that is not ready yet: `fill` it, or `release`
        it. The reason it was refused, or None."""
        with self._ready:
            if self._size >= self.capacity:
                return f"queue is full ({self.capacity} waiting); retry later"
            if self._taken[client] >= self.per_client:
                return f"this client already has {self.per_client} requests waiting; retry later"
            self._taken[client] += 1
            self._size += 1
            return None

    def fill(self, client: Hashable, item: T) -> None:
        """Queue `item` in the place held for it."""
        with self._ready:
            self._waiting.setdefault(client, deque()).append(item)
            self._ready.notify()

    def release(self, client: Hashable) -> None:
        """Give back a place held for an item that will not come."""
        with self._ready:
            self._let_go(client)

    def get(self, block: bool = True) -> T | None:
        """The next item in turn, waiting for one if `block`; None once closed (or, not
        blocking, when none waits)."""
        with self._ready:
            while block and not self._waiting and not self._closed:
                self._ready.wait()
            if not self._waiting:
                return None
            client, items = next(iter(self._waiting.items()))
            item = items.popleft()
            self._let_go(client)
            if items:
                self._waiting.move_to_end(client)  # its next item waits for every other client's turn
            else:
                del self._waiting[client]
            return item

    def close(self) -> None:
        """Wake the consumer: `get` returns what is left, then None."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _let_go(self, client: Hashable) -> None:
        self._size -= 1
        self._taken[client] -= 1
        if not self._taken[client]:
            del self._taken[client]


class StreamingModel(Protocol):
    """What the engine needs of `edgellm.Model`."""

    manifest: Any
    max_context: int
    tokenizer: Any  # and conventions: what a request's grammar is compiled for
    conventions: Any

    def params(self, params: Mapping[str, Any], ceiling: int | None = None) -> GenerationParams: ...

    def prompt_ids(self, prompt: Any, params: GenerationParams) -> list[int]: ...

    def ground(self, prompt: Any, params: GenerationParams) -> tuple[Any, list[Any]]: ...

    def scheduler(self, slots: int) -> Any: ...


@dataclass
class Outcome:
    """How a job ended: its last chunk (finish_reason, usage, the whole `Result`), or the error that ended it.

    A GenerationError is the request's fault (a prompt too long for the context); any
    other error is ours. `waited_out`: cancelled while still queued, never run."""

    last: Any = None
    error: Exception | None = None
    waited_out: bool = False


@dataclass
class Job:
    """One request. The callbacks run on the worker thread and must not block for long:
    they stand between two tokens."""

    prompt: Any
    params: GenerationParams  # checked by the front (`Engine.params`); trusted as it is
    client: Hashable  # whose share of the queue it takes
    on_chunk: Callable[[Any], None]
    on_end: Callable[[Outcome], None]
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    # Whose prompt it is: cached rows are reused only within a tenant (and its cache_salt), besides
    # the prefixes declared shared (Model.share_prefix). "" is the Python API's one user.
    tenant: str = ""
    sources: list[Any] = dataclasses.field(default_factory=list)  # retrieval's, set when it is prepared


class Engine:
    """Serves one model to any number of fronts; `start()`, `submit()`, then `close()`.

    Up to `slots` requests decode together (above 1, on a graph exported with a batch
    dimension), one batched step for all of them (`edgellm.scheduler`); a request joins as
    soon as a slot is free and leaves when it ends."""

    def __init__(self, model: StreamingModel, queue_size: int = 8, per_client: int | None = None,
                 max_tokens: int = 1024, slots: int = 1) -> None:
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        if slots > 1 and not model.manifest.graph.batch:
            log.warning("%d slots asked for, but this bundle's graph has no batch dimension (export it again "
                        "with this edgellm): serving one request at a time", slots)
            slots = 1
        self.model = model
        self.max_tokens = max_tokens  # the most any one request may generate: one request cannot hold every client
        self.slots = slots
        self._jobs: FairQueue[Job] = FairQueue(queue_size, per_client or max(1, queue_size // 2))
        # Jobs whose grammar compiles, in turn across clients; their places in _jobs bound them.
        self._compiling: FairQueue[Job] = FairQueue(queue_size, queue_size)
        self._grammars: dict[int, Any] = {}  # each job's compiled grammar, held (so cached) until it ends
        self._by_id: dict[int, Job] = {}  # queued or running, cancelled on close
        self._lock = threading.Lock()
        self.active = 0  # jobs generating now
        self._worker = threading.Thread(target=self._work, name="edgellm-generate", daemon=True)
        self._compiler = threading.Thread(target=self._compile, name="edgellm-grammar", daemon=True)
        self._closed = False
        self.observers: list[Callable[[Outcome], None]] = []  # told of every job's end (metrics)

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def start(self) -> "Engine":
        self.model.tokenizer.bytes_per_token  # cannot_fit's bound, worked out once (0.1 s) before any request waits on it
        for thread in (self._worker, self._compiler):
            if not thread.is_alive():
                thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Cancel every queued and running job (each still gets its `on_end`), then stop the threads."""
        with self._lock:
            self._closed = True
            for job in self._by_id.values():
                job.cancel.set()
        self._compiling.close()
        self._jobs.close()
        for thread in (self._compiler, self._worker):
            if thread.is_alive():
                thread.join(timeout)

    def submit(self, job: Job) -> str | None:
        """Queue `job` (one held to a grammar once it is compiled); the reason it was refused
        (busy), or None."""
        with self._lock:
            if self._closed:
                return "the service is shutting down"
            p = job.params
            if p.response_format is None and p.grammar is None and not p.tools and p.retrieval is None:
                refusal = self._jobs.put(job.client, job)
            elif (refusal := self._jobs.hold(job.client)) is None:
                self._compiling.put(job.client, job)
            if refusal is None:
                self._by_id[id(job)] = job
            return refusal

    def params(self, params: Mapping[str, Any]) -> GenerationParams:
        """A front's request parameters (`params.from_wire`'s, or any by API name) over the bundle's
        defaults, with the token budget within the service's ceiling: the one build of a request, on
        the front's thread. GenerationError names the field (max_new_tokens above the ceiling),
        which each front spells its way."""
        return self.model.params(params, ceiling=self.max_tokens)

    def cannot_fit(self, prompt: Any, params: GenerationParams) -> str | None:
        """Why `prompt` is refused before the queue, its length alone ruling it out (`text.cannot_fit`:
        a megabyte of text is never rendered or tokenized); None when it may fit. A prompt to be cut
        on the left (`truncate`) always fits. Every front asks this on its receiving thread."""
        if params.truncate == "left":
            return None
        return cannot_fit(prompt, self.model.tokenizer, self.model.max_context)

    # -- grammar thread ------------------------------------------------------

    def _compile(self) -> None:
        """Prepare each job off the receiving and decoding threads (its retrieval's sources into its
        prompt, its grammar compiled within grammar.py's limits), then queue it in its held place,
        or end it with the error."""
        while (job := self._compiling.get()) is not None:
            if job.cancel.is_set():
                self._drop(job, Outcome(waited_out=True))
                continue
            try:
                job.prompt, job.sources = self.model.ground(job.prompt, job.params)
                grammar = request_grammar(job.params, self.model.tokenizer, self.model.conventions)
            except Exception as exc:  # noqa: BLE001 - handed to the front, which reports it
                self._drop(job, Outcome(error=exc))
                continue
            with self._lock:
                if not job.cancel.is_set():  # close() cancels every job before it closes the queue
                    self._grammars[id(job)] = grammar
                    self._jobs.fill(job.client, job)
                    continue
            self._drop(job, Outcome(waited_out=True))

    def _drop(self, job: Job, outcome: Outcome) -> None:
        """End a job that never entered the queue."""
        self._jobs.release(job.client)
        self._end(job, outcome)

    # -- worker thread -------------------------------------------------------

    def _end(self, job: Job, outcome: Outcome) -> None:
        with self._lock:
            self._by_id.pop(id(job), None)
            self._grammars.pop(id(job), None)
        for tell in (job.on_end, *self.observers):
            try:
                tell(outcome)
            except Exception:  # noqa: BLE001 - one front's failure must never stop the worker
                log.exception("a front failed to finish a request")
        if not len(self._jobs) and not self.active:
            release_freed_heap()  # a long prompt's buffers go back to the OS while idle

    def _work(self) -> None:
        """Admit jobs into free slots between steps, one step for all of them."""
        scheduler = self.model.scheduler(self.slots)
        live: dict[int, Job] = {}
        while True:
            # Wait for work only when nothing decodes; otherwise take what fits and step on.
            job = self._jobs.get(block=not live) if len(live) < self.slots else None
            if job is None and not live:
                return  # closed, and nothing left to finish
            while job is not None:
                self._admit(scheduler, live, job)
                job = self._jobs.get(block=False) if len(live) < self.slots else None
            self.active = len(live)
            try:
                events = scheduler.step()
            except Exception as exc:  # noqa: BLE001 - every job of the step is told; the slots start afresh
                for key in list(live):
                    self._retire(live, key, Outcome(error=exc))
                scheduler = self.model.scheduler(self.slots)
                continue
            for key, chunk in events:
                if isinstance(chunk, GenerationError):  # that request's own failure: the others go on
                    self._retire(live, key, Outcome(error=chunk))
                    continue
                self._deliver(live[key], chunk)
                if chunk.finish_reason is not None:
                    self._retire(live, key, Outcome(chunk))

    def _retire(self, live: dict[int, Job], key: int, outcome: Outcome) -> None:
        """End a job that was decoding; the count drops first, so the last one frees the heap (`_end`)."""
        job = live.pop(key)
        self.active = len(live)
        self._end(job, outcome)

    def _admit(self, scheduler: Any, live: dict[int, Job], job: Job) -> None:
        if job.cancel.is_set():
            self._end(job, Outcome(waited_out=True))
            return
        params = dataclasses.replace(job.params, cancel=job.cancel)  # no check: replace() only copies
        try:
            ids = self.model.prompt_ids(job.prompt, params)  # the template renders and the prompt may not fit
        except Exception as exc:  # noqa: BLE001 - a bad request is the front's to report
            self._end(job, Outcome(error=exc))
            return
        scheduler.add(id(job), ids, params, tenant=job.tenant, sources=job.sources)
        live[id(job)] = job

    def _deliver(self, job: Job, chunk: Any) -> None:
        try:
            job.on_chunk(chunk)
        except Exception:  # noqa: BLE001 - one front's failure must not stop the others' sequences
            log.exception("a front failed to take a chunk")
            job.cancel.set()

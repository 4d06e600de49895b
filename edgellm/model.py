"""`edgellm.load` and `Model`: a verified bundle on a session, ready to generate."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .runtime.bundle import Manifest, bundle_file, read_manifest
from .errors import BundleError, ContextLengthError, GenerationError
from .params import Checked, GenerationParams, checked
from .runtime.caches import SharedPrefixes, common_prefix, kv_dtype
from .reasoning import CONFIG_KEY, detect_markers, template_extras
from .runtime.providers import ProviderSpec, create_session
from .runtime.residency import MappedWeights, release_freed_heap
from .runtime.runner import BatchRunner, OneTokenRunner, Runner, open_runner, open_slots, prefill
from .scheduler import OneSlot, Scheduler
from .sequence import Chunk, Conventions, Result
from .speculate import NEEDS_DRAFT
from .runtime.model_spec import ModelSpec
from .messages import check_messages
from .text import ChatTemplate, Tokenizer, encode_chat, template_variables
from .tools import CLOSE, OPEN, call_syntax, chat_inputs

if TYPE_CHECKING:
    from .retrieval.embed import EmbeddingModel
    from .retrieval.grounding import Citation
    from .retrieval.retriever import Retriever
    from .scheduler import Scheduler
    from .runtime.devices import DeviceProfile

log = logging.getLogger("edgellm")

# Keeps the preallocated KV cache small on a Pi unless a profile or the caller asks for more.
DEFAULT_MAX_CONTEXT = 4096

# generate_many's cache slots unless asked. A step's cost grows with its rows (SmolLM2
# int4, issue 14: 4 rows give 2.0x one row's tokens/s, 8 rows 2.8x), and a slot's
# memory is only the rows written into it.
DEFAULT_SLOTS = 4

# Text, chat messages, or token ids (for scoring and benchmarks that must feed exact ids).
Prompt = str | Sequence[dict[str, str]] | Sequence[int]

# What `Model.share_prefix` follows a prompt with: the shared ids are those that stay the same
# whatever comes next (a user turn, more text, one that starts with a space or a line break).
_PROBES = ("x", " 1", "\n")


def load(
    path: str | os.PathLike[str],
    *,
    profile: "str | os.PathLike[str] | DeviceProfile | None" = None,
    providers: Sequence[ProviderSpec] | None = None,
    threads: int | None = None,
    max_context: int | None = None,
    verify: bool = True,
    draft: "str | os.PathLike[str] | Model | None" = None,
) -> "Model | EmbeddingModel":
    """Open a bundle. Explicit arguments override the device profile's values. An embedding
    bundle opens as an `EmbeddingModel` (`embed(texts)`), every other kind as a `Model`.

    `verify` checks every file's sha256 against the manifest first, so a corrupt
    copy on an SD card is refused before it produces garbage. `draft`: a smaller bundle
    (or loaded Model) with the same tokenizer, for `speculative="draft_model"`.
    """
    root = Path(path)
    manifest = read_manifest(root, verify=verify)
    prof = _profile(profile)
    if prof is not None:
        providers = providers if providers is not None else prof.providers
        threads = threads if threads is not None else prof.threads
        max_context = max_context if max_context is not None else prof.max_context
    graph = manifest.graph
    if graph.kind == "embedding":  # a sentence encoder: texts in, vectors out
        from .retrieval.embed import EmbeddingModel

        return EmbeddingModel.open(root, manifest, providers, threads)
    wanted = DEFAULT_MAX_CONTEXT if max_context is None else max_context
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 2:
        raise GenerationError(f"max_context must be an integer >= 2, got {wanted!r}")
    context = graph.fixed_context or min(wanted, manifest.spec.max_context)
    graph_path = bundle_file(root, graph.file)
    if prof is not None:
        _warn_memory(prof, root, manifest, context, kv_dtype(graph.kv_dtype).itemsize)
    # The tokenizer first: parsing its JSON peaks at several times its size, and that
    # peak should not stack on the session's (45 MB of 280 for SmolLM2, measured).
    tokenizer = Tokenizer.from_bundle(root, manifest.generation)
    template = ChatTemplate.from_bundle(root, manifest.generation)
    conventions = Conventions(
        markers=detect_markers(template.source, tokenizer.token_to_id, manifest.generation.get(CONFIG_KEY)),
        syntax=call_syntax(template.source),
        call_tags={OPEN, CLOSE} <= tokenizer.added_tokens,
        native_tools="tools" in template_variables(template.source))
    release_freed_heap()
    mapped = MappedWeights(root)
    with mapped.loading():
        session = create_session(graph_path, providers=providers, threads=threads, block_sums=graph.block_sums)
    _warn_target(graph.target, session.get_providers()[0])
    runner = open_runner(session, graph, manifest.spec, context, where=str(graph_path))
    try:
        defaults = checked(manifest.generation.get("defaults") or {}, runner.vocab_size)
        GenerationParams.build(defaults, {}, runner.vocab_size)
    except GenerationError as exc:
        raise BundleError(f"{root / 'manifest.json'}: generation.defaults: {exc}") from None
    model = Model(root, manifest, runner, tokenizer, template, defaults, conventions)
    model.profile = prof
    model.mapped = mapped
    if draft is not None:
        model.draft = draft if isinstance(draft, Model) else load(
            draft, profile=profile, providers=providers, threads=threads, max_context=max_context, verify=verify)
        if model.draft.tokenizer.tokenizer.get_vocab() != tokenizer.tokenizer.get_vocab():
            raise BundleError(f"{model.draft.path}: the draft model's vocabulary differs from {root}'s; a draft "
                              "must share the tokenizer")
    release_freed_heap()
    return model


def _profile(profile: "str | os.PathLike[str] | DeviceProfile | None") -> "DeviceProfile | None":
    if profile is None or not isinstance(profile, (str, os.PathLike)):
        return profile
    from .runtime.devices import load_profile

    return load_profile(profile)


def _warn_memory(prof: "DeviceProfile", root: Path, manifest: Manifest, context: int, kv_bytes: int,
                 slots: int = 1) -> None:
    from .runtime.devices import memory_warning

    # The graph file and its external-data siblings (model.onnx.data) are the weights.
    stem = Path(manifest.graph.file).name
    weights = sum(bundle_file(root, f).stat().st_size for f in manifest.files if Path(f).name.startswith(stem))
    if warning := memory_warning(prof, manifest.spec, context, weights, kv_bytes, slots):
        log.warning("%s", warning)


def _warn_target(target: str, provider: str) -> None:
    """A graph built for one kind of device runs on another, slowly: CUDA's attention takes only
    float16, the CPU runs float16 ops through casts, and the OpenVINO and QNN graphs are shaped
    for those compilers."""
    on_cuda = provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    if target == "cuda" and not on_cuda:
        log.warning("this bundle was exported with --target cuda but runs on %s: float16 on a CPU is slower "
                    "than the default export", provider)
    elif target == "cpu" and on_cuda:
        log.warning("this bundle's float32 graph runs on %s, whose attention takes float16 only: export it "
                    "with --target cuda", provider)
    elif target == "openvino" and provider != "OpenVINOExecutionProvider":
        log.warning("this bundle was exported with --target openvino but runs on %s, whose kernels take its "
                    "weights' float zero points slowly (SmolLM2: 30x slower steps): use the default export", provider)
    elif target == "qnn" and provider != "QNNExecutionProvider":
        log.warning("this bundle was exported with --target qnn but runs on %s: every token, prompt included, is "
                    "a step over the whole fixed context; use the default export off the NPU", provider)


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Model:
    """A loaded bundle. Generation keeps the KV cache of the last request, so a
    follow-up that repeats its prefix (a chat turn, a fixed system prompt) prefills
    only what is new. Requests of different tenants (`stream`'s `tenant`, a front's
    client) reuse only the prefixes declared shared (`share_prefix`).

    Not thread-safe by design: one caller drives it (the service's engine, one worker thread,
    many requests on one scheduler). Starting a new generation abandons any stream still open
    on this model.
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        runner: Runner | OneTokenRunner,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        defaults: Checked,
        conventions: Conventions = Conventions(),
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.template = template
        self._runner = runner
        self._defaults = defaults  # checked once, at load
        self.conventions = conventions
        self.draft: Model | None = None  # a smaller model with the same tokenizer, for speculative="draft_model"
        self._generation = 0  # which stream owns the cache; older ones must not touch it
        self._batch: BatchRunner | None = None  # generate_many's slots, kept for prefix reuse
        self.profile: "DeviceProfile | None" = None  # the device profile it was loaded with: memory warnings
        self.mapped: MappedWeights | None = None  # its weight files' pages, given back as it runs
        self.shared = SharedPrefixes()  # prefixes every tenant may reuse: share_prefix
        self.retriever: Retriever | None = None  # the indexes a request's `retrieval` may name

    @property
    def spec(self) -> ModelSpec:
        return self.manifest.spec

    @property
    def providers(self) -> list[str]:
        """The providers the session actually runs on, best first."""
        return self._runner.session.get_providers()

    @property
    def max_context(self) -> int:
        return self._runner.capacity

    @property
    def cached_tokens(self) -> list[int]:
        """The ids whose keys and values the cache holds now."""
        return list(self._runner.tokens)

    def reset(self) -> None:
        """Forget the cached prefix (the next request prefills from scratch, but for a prefix
        declared shared, which stays), generate_many's slots too."""
        self._runner.rewind(0)
        self._batch = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True, **extra: Any) -> str:
        return self.template.render(check_messages(list(messages)), add_generation_prompt=add_generation_prompt,
                                    **extra)

    def prompt_ids(self, prompt: Prompt, params: GenerationParams) -> list[int]:
        """Token ids of a plain prompt, of messages rendered through the chat template
        (with the request's tools and reasoning mode), or the ids themselves, fitted to the context."""
        if params.tools and not (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict)):
            raise GenerationError("tools need chat messages: the chat template renders them")
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(_is_id(t) for t in prompt):
            vocab = self._runner.vocab_size
            if (bad := next((t for t in prompt if not 0 <= t < vocab), None)) is not None:
                raise GenerationError(f"prompt token id {bad} is out of range for a vocabulary of {vocab}")
            ids = list(prompt)
        elif isinstance(prompt, (list, tuple)):
            messages, variables = chat_inputs(list(prompt), self.template.source, params.tools, params.tool_choice)
            variables.update(template_extras(params.reasoning or "separate", self.template.source))
            # Not encode(render_chat(...)): special-token strings in the messages stay text.
            ids = encode_chat(self.tokenizer, self.template, messages,
                              add_generation_prompt=params.add_generation_prompt, **variables)
        else:
            raise GenerationError(
                f"prompt must be a string, a list of messages or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise GenerationError("prompt is empty")
        limit = self.max_context
        if len(ids) <= limit:
            return ids
        if params.truncate != "left":
            raise ContextLengthError(f"prompt has {len(ids)} tokens, context is {limit}")
        # Leave room for the answer, but never keep less than half the context.
        keep = max(limit - params.max_new_tokens, limit // 2)
        return ids[-keep:]

    def stream(self, prompt: Prompt, *, tenant: str = "", **params: Any) -> Iterator[Chunk]:
        """Yield text deltas as they are ready; the last chunk carries finish_reason, usage and the
        whole `Result` (`Chunk.result`). It runs on the scheduler as any request does, alone.

        Parameters are validated here, before the first chunk is asked for. `tenant` is whose
        request it is (a front sets it: an HTTP key or address, an MQTT reply topic): it reuses
        cached rows only of its own tenant's requests with the same `cache_salt`, and the
        prefixes declared shared, so its usage and time to first token say nothing of another
        tenant's prompt. The Python API's one user leaves it "" and reuses everything it wrote.
        """
        started = time.perf_counter()
        p = self.params(params)
        prompt, sources = self.ground(prompt, p)
        scheduler = self.scheduler(1)
        scheduler.add(0, self.prompt_ids(prompt, p), p, started, tenant, sources)
        return self._owned(chunk for _, chunk in scheduler.run())

    def share_prefix(self, prompt: Prompt) -> int:
        """Declare the start of `prompt` shared between tenants (a service's system prompt, a
        recipe's); return how many tokens that is. Messages stand for a chat that begins with
        them, text for a prompt that begins with it: the shared ids are those that stay the same
        whatever follows. Token ids are shared as they are.

        The rows are computed now and a copy kept (SmolLM2, int8 KV: 11.5 KB a token): any tenant's
        request that starts with these ids restores them instead of prefilling them, and its
        usage counts them cached. Everything after them stays private to each tenant. Call it
        before serving: like any call on a Model, it must not overlap a generation."""
        p = GenerationParams.build(self._defaults, {}, self._runner.vocab_size)
        if isinstance(prompt, str):
            renders = [self.prompt_ids(prompt + probe, p) for probe in _PROBES]
        elif isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            renders = [self.prompt_ids([*prompt, {"role": "user", "content": probe}], p) for probe in _PROBES]
        else:
            renders = [self.prompt_ids(prompt, p)]
        ids = renders[0][:min(common_prefix(renders[0], other, len(other)) for other in renders)]
        if not ids:
            raise GenerationError("nothing of this prompt stays the same whatever follows it: no prefix to share")
        self._generation += 1  # an open stream is abandoned: its cache is rewritten here
        runner = self._runner
        runner.rewind(0)
        prefill(runner.forward, ids)
        self.shared.add(ids, runner.cache.snapshot(len(ids)))
        return len(ids)

    def params(self, params: Mapping[str, Any], ceiling: int | None = None) -> GenerationParams:
        """A request's parameters over the bundle's defaults, checked (GenerationError names the
        first bad one); `Checked` ones (a front's `params.from_wire`) only against this model.
        `ceiling`: a service's most tokens per request (`GenerationParams.build`)."""
        p = GenerationParams.build(self._defaults, params, self._runner.vocab_size, ceiling)
        if p.speculative == "draft_model" and self.draft is None:
            raise GenerationError(NEEDS_DRAFT, field="speculative")
        if p.retrieval is not None:
            if self.retriever is None:
                raise GenerationError("retrieval needs document indexes and the model that embeds them: serve "
                                      "with --index NAME=FILE --embedding BUNDLE", field="retrieval")
            self.retriever.check(p.retrieval)
        return p

    def ground(self, prompt: Prompt, params: GenerationParams) -> "tuple[Prompt, list[Citation]]":
        """`prompt` with its `retrieval`'s sources in the system turn, and those sources (none
        without retrieval). It embeds the question: the engine calls it off its worker thread."""
        if params.retrieval is None or self.retriever is None:
            return prompt, []
        return self.retriever.ground(prompt, params.retrieval)

    def request(self, prompt: Prompt, **params: Any) -> tuple[list[int], GenerationParams]:
        """A request's prompt ids (its retrieval's sources in them) and parameters, validated over
        the bundle's defaults (GenerationError names the first bad one)."""
        p = self.params(params)
        return self.prompt_ids(self.ground(prompt, p)[0], p), p

    def generate(self, prompt: Prompt, **params: Any) -> Result:
        """The whole completion at once; same parameters as `stream`."""
        *_, last = self.stream(prompt, **params)
        return last.result

    def _owned(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        # Two interleaved streams would write into one cache; the older one stops instead.
        self._generation += 1
        mine = self._generation
        for chunk in chunks:
            yield chunk
            if self._generation != mine and chunk.finish_reason is None:
                chunks.close()
                raise GenerationError("another generation started on this model; this stream was abandoned")

    def generate_many(self, prompts: Sequence[Prompt], *, slots: int | None = None,
                      each: Sequence[dict[str, Any]] | None = None, **params: Any) -> list[Result]:
        """Complete several prompts together, one Result per prompt, in order.

        Up to `slots` (default: min(prompts, 4)) decode in one batched step; the rest
        start as slots free. `each[i]` adds parameters for prompt i over `params`. Each
        slot keeps its cache for the next call, so a returning prompt prefix is reused.
        A graph exported without a batch dimension runs one slot; a generic, openvino or
        qnn graph runs the prompts one after another.
        """
        started = time.perf_counter()
        each = list(each) if each is not None else [{}] * len(prompts)
        if len(each) != len(prompts):
            raise GenerationError(f"each has {len(each)} parameter sets for {len(prompts)} prompts")
        if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or slots < 1):
            raise GenerationError(f"slots must be an integer >= 1, got {slots!r}")
        requests = []
        for prompt, extra in zip(prompts, each):
            p = self.params({**params, **extra})
            grounded, sources = self.ground(prompt, p)
            requests.append((self.prompt_ids(grounded, p), p, sources))
        n = slots or min(max(len(prompts), 1), DEFAULT_SLOTS)
        scheduler = self.scheduler(n if self._batches else 1)
        for i, (prompt_ids, p, sources) in enumerate(requests):
            scheduler.add(i, prompt_ids, p, started, sources=sources)
        self._generation += 1  # an open stream is abandoned, as a new stream would abandon it
        results = {i: chunk.result for i, chunk in scheduler.run() if chunk.result is not None}
        return [results[i] for i in range(len(prompts))]

    def scheduler(self, slots: int = 1) -> Scheduler:
        """The decode loop (`edgellm.scheduler`) over `slots` cache slots, for whoever drives
        requests: `stream`, `generate_many`, the engine. One slot is the model's own cache, as
        is every slot asked of a graph without a batch dimension; a generic, openvino or qnn
        graph is refused more than one."""
        graph = self.manifest.graph
        one = slots == 1 or (graph.takes_slots and not graph.batch)
        return Scheduler(OneSlot(self._runner) if one else self._slots(slots), self.tokenizer, self.conventions,
                         shared=self.shared, draft=self.draft._runner if self.draft is not None else None)

    @property
    def _batches(self) -> bool:
        """Whether cache slots can run this graph (a generic, openvino or qnn one runs one request at a time)."""
        return self.manifest.graph.takes_slots

    def _slots(self, n: int) -> BatchRunner:
        if self._batch is None or len(self._batch.slots) != n:
            self._batch = None  # release the old slots' buffers before mapping new ones
            graph = self.manifest.graph
            if self.profile is not None and n > 1:
                _warn_memory(self.profile, self.path, self.manifest, self.max_context,
                             kv_dtype(graph.kv_dtype).itemsize, n)
            self._batch = open_slots(self._runner.session, graph, self.spec, self.max_context, n,
                                     where=str(bundle_file(self.path, graph.file)))
        return self._batch

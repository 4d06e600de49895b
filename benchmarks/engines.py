"""One small adapter per engine, all driven the same way by `worker.py`.

Each adapter imports its library only when built, so an engine's process carries
nothing of the others in its memory. Every engine gets the same token ids (edgellm
gets their text and tokenizes it to the same ids, or the ids when the text is empty) and decodes greedily until
`max_new_tokens`, whatever it samples: edgellm with `ignore_eos`, genai with
`min_length` (which masks EOS), llama.cpp by not stopping (its low-level `generate`
never stops on EOS by itself).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np


@dataclass
class Run:
    """One request, measured the same way for every engine."""

    ttft_s: float  # request start to the first sampled token
    decode_tokens_per_s: float  # tokens after the first over the time after the first
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV was reused rather than recomputed
    token_ids: list[int]


class Engine(Protocol):
    name: str

    def reset(self) -> None:
        """Forget any cached prefix, so the next request starts cold."""
        ...

    def generate(self, text: str, ids: Sequence[int], max_new_tokens: int) -> Run: ...


def _timed(tokens: Iterator[int], started: float, limit: int, prompt_tokens: int, cached: int) -> Run:
    """Drain `tokens` up to `limit`, timing the first and the last the way edgellm's usage does."""
    out: list[int] = []
    first = last = 0.0
    for token in tokens:
        last = time.perf_counter()
        first = first or last
        out.append(token)
        if len(out) >= limit:
            break
    rate = (len(out) - 1) / (last - first) if len(out) > 1 and last > first else 0.0
    return Run(first - started, rate, prompt_tokens, cached, out)


def perplexity(logits: np.ndarray, ids: Sequence[int]) -> float:
    """exp(mean NLL) of ids[1:] given the logits at positions [:-1]."""
    logits = np.asarray(logits, dtype=np.float64)[: len(ids) - 1]
    top = logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    nll = logz - logits[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return float(np.exp(nll.mean()))


class EdgeLLM:
    name = "edgellm"

    def __init__(self, bundle: Path, threads: int, context: int) -> None:
        import edgellm

        self.model = edgellm.load(bundle, threads=threads, max_context=context)

    def reset(self) -> None:
        self.model.reset()

    def generate(self, text: str, ids: Sequence[int], max_new_tokens: int) -> Run:
        # No text: the ids themselves (a synthetic vocabulary's prompt has no text worth encoding).
        prompt = text or list(ids)
        r = self.model.generate(prompt, max_new_tokens=max_new_tokens, ignore_eos=True, temperature=0)
        u = r.usage
        return Run(u.ttft_s, u.decode_tokens_per_s, u.prompt_tokens, u.cached_prompt_tokens, list(r.token_ids))


class Genai:
    """onnxruntime-genai: one Generator per request, as its API is meant to be used;
    a new Generator starts from an empty cache, so nothing is reused across requests."""

    name = "onnxruntime-genai"

    def __init__(self, model_dir: Path, threads: int, context: int) -> None:
        import onnxruntime_genai as og

        decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        # Its sliding-window attention (Gemma 3) refuses a cache shorter than the window.
        self.cache_floor = (decoder.get("sliding_window") or {}).get("window_size", 0)
        config = og.Config(str(model_dir))
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.og, self.model = og, og.Model(config)

    def reset(self) -> None:
        pass

    def generate(self, text: str, ids: Sequence[int], max_new_tokens: int) -> Run:
        started = time.perf_counter()
        params = self.og.GeneratorParams(self.model)
        total = len(ids) + max_new_tokens
        params.set_search_options(max_length=max(total, self.cache_floor), min_length=total, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(list(ids))

        def tokens() -> Iterator[int]:
            while not generator.is_done():
                generator.generate_next_token()
                yield int(generator.get_next_tokens()[0])

        return _timed(tokens(), started, max_new_tokens, len(ids), 0)

    def perplexity(self, ids: Sequence[int]) -> float:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max(len(ids) + 1, self.cache_floor))
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(list(ids))
        return perplexity(generator.get_output("logits")[0], ids)


class LlamaCpp:
    """llama.cpp through llama-cpp-python's `generate`, which keeps the KV of the previous
    request and re-evaluates only what follows the longest common prefix."""

    name = "llama.cpp"

    def __init__(self, gguf: Path, threads: int, context: int, logits_all: bool = False) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=threads,
            logits_all=logits_all, verbose=False,
        )

    def reset(self) -> None:
        self.llm.reset()

    def generate(self, text: str, ids: Sequence[int], max_new_tokens: int) -> Run:
        started = time.perf_counter()
        # generate() keeps the longest common prefix of its state and the prompt, but always
        # re-evaluates at least the last prompt token (our requests never repeat a whole prompt).
        held = self.llm.input_ids[: self.llm.n_tokens].tolist()
        common = next((i for i, (a, b) in enumerate(zip(held, ids)) if a != b), min(len(held), len(ids)))
        cached = min(common, len(ids) - 1)
        tokens = self.llm.generate(list(ids), temp=0.0, repeat_penalty=1.0, reset=True)
        return _timed((int(t) for t in tokens), started, max_new_tokens, len(ids), cached)

    def perplexity(self, ids: Sequence[int]) -> float:
        self.llm.reset()
        self.llm.eval(list(ids))
        return perplexity(self.llm.scores[: len(ids)], ids)


# "edgellm-requant" is the same runtime on a `--requantize` bundle: the weights genai's builder makes.
ENGINES = {"edgellm": EdgeLLM, "edgellm-requant": EdgeLLM, "genai": Genai, "llamacpp": LlamaCpp}

"""Prompt-lookup speculation against plain decode, and against llama.cpp's prompt lookup: issue 14's bar.

    python benchmarks/speculative.py [--bundle DIR] [--gguf FILE] [--genai DIR] [--tokens 96] [--runs 4] [--threads 2]
                                     [--json out.json]

Workload: answers that quote their input, as anomaly explanations do (sensor names, readings
and baselines repeated back), next to a control whose answer is free text. Each prompt is run
greedily with and without `speculative="prompt_lookup"`, in one process, repetitions
interleaved and the first one a warm-up; the rate is the whole generation's completion tokens
over its wall time after the first token (speculation emits several tokens in one step, so the
per-token pace is what it changes). Greedy text is compared token for token: on an int4 bundle
MatMulNBits computes one row and several rows differently, so the texts may part after a
near-tie; the table says where they did. llama.cpp (llama-cpp-python, if installed) runs the
same prompts on the GGUF with and without `LlamaPromptLookupDecoding`. onnxruntime-genai, given
its model folder (`genai_build.py` makes one from the same GGUF), decodes the same token ids with
and without its n-gram speculation (`set_speculative_options`, genai 0.18 and later); its greedy
texts are compared with each other as edgellm's are.
Progress on stderr; the table and the PASS/FAIL lines on stdout.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from engines import Genai  # noqa: E402
from structured import ensure_bundle  # noqa: E402

BAR_VS_PLAIN = 1.6  # quoting workload, prompt lookup over plain decode
BAR_VS_LLAMA = 1.2  # edgellm's prompt lookup over llama.cpp's, same prompts
SYSTEM = "You are a maintenance assistant. Quote the sensor data exactly when you refer to it."
EVENTS = [
    "machine press-7, sensor spindle-vibration, value 9.4 mm/s RMS, baseline 2.1 mm/s RMS, at 14:02:11",
    "machine extruder-2, sensor barrel-zone-3-temperature, value 248.6 degC, baseline 231.0 degC, at 09:40:55",
    "machine conveyor-11, sensor drive-motor-current, value 17.9 A, baseline 11.2 A, at 22:15:03",
]
PROMPTS = {
    "quoting": [f"Copy this anomaly record into a ticket, word for word, then one line of advice.\n{e}"
                for e in EVENTS],
    "free": ["Explain in a few sentences why bearings wear out.", "What does a PLC do in a factory?",
             "Give three tips for saving energy in a workshop."],
}


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def rate(started_first: float, end: float, tokens: int) -> float:
    return (tokens - 1) / (end - started_first) if tokens > 1 and end > started_first else 0.0


def run_edgellm(model: Any, text: str, tokens: int, speculative: str) -> dict[str, Any]:
    model.reset()
    first = 0.0
    ids: list[int] = []
    for chunk in model.stream(messages(text), max_new_tokens=tokens, speculative=speculative):
        first = first or time.perf_counter()
        ids += chunk.token_ids
        last = chunk
    end = time.perf_counter()
    u = last.usage
    return {"tokens": u.completion_tokens, "rate": rate(first, end, u.completion_tokens), "ids": ids,
            "drafted": u.draft_tokens, "accepted": u.accepted_draft_tokens}


def llama_runners(gguf: Path, threads: int) -> dict[str, Any] | None:
    if importlib.util.find_spec("llama_cpp") is None:
        report.stage("llama-cpp-python is not installed: the llama.cpp columns are skipped")
        return None
    # A build for instructions this CPU lacks dies with SIGILL: try it in a child first.
    probe = subprocess.run([sys.executable, "-c", "import sys; from llama_cpp import Llama; "
                            "Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)", str(gguf)],
                           capture_output=True, timeout=300)
    if probe.returncode != 0:
        report.stage(f"llama-cpp-python cannot load the GGUF here (exit {probe.returncode}; a build for "
                     "instructions this CPU lacks?): the llama.cpp columns are skipped")
        return None
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    common = dict(model_path=str(gguf), n_threads=threads, n_ctx=2048, verbose=False)
    return {"off": Llama(**common),
            "prompt_lookup": Llama(**common, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))}


# genai's n-gram drafting: 4-token suffixes, drafts of at most 8 tokens, chained lookups, the draft
# length adapted to acceptance but never below 2.
GENAI_NGRAM = {"ngram_size": 4, "max_draft_tokens": 8, "ngram_chained_lookup": True, "min_adaptive_k": 2}


def genai_model(model_dir: Path | None, threads: int) -> Any | None:
    if model_dir is None:
        report.stage("no --genai model folder: the onnxruntime-genai columns are skipped")
        return None
    import onnxruntime_genai as og

    if not hasattr(og.GeneratorParams, "set_speculative_options"):
        report.stage(f"onnxruntime-genai {og.__version__} has no n-gram speculation: its columns are skipped")
        return None
    return Genai(model_dir, threads, 0).model


def run_genai(model: Any, ids: list[int], tokens: int, speculative: str) -> dict[str, Any]:
    """Greedy until EOS or `tokens`, as the other engines; drafting wants no repetition penalty,
    no no-repeat n-grams and no min_length, which are genai's defaults for this folder."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
    if speculative != "off":
        params.set_speculative_options(**GENAI_NGRAM)
        taken = params.get_speculative_options()
        if any(taken.get(k) != v for k, v in GENAI_NGRAM.items()):
            raise SystemExit(f"onnxruntime-genai kept speculative options {taken}, not {GENAI_NGRAM}")
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    first, out = 0.0, []
    while not generator.is_done():  # drafted tokens still come out one per call
        generator.generate_next_token()
        first = first or time.perf_counter()
        out.append(int(generator.get_next_tokens()[0]))
    end = time.perf_counter()
    stats = generator.get_speculative_stats() if speculative != "off" else {}
    return {"tokens": len(out), "rate": rate(first, end, len(out)), "ids": out,
            **({"drafted": int(stats["draft_tokens_evaluated"]), "accepted": int(stats["draft_tokens_accepted"])}
               if stats else {})}


def run_llama(llm: Any, text: str, tokens: int) -> dict[str, Any]:
    llm.reset()
    first, count = 0.0, 0
    for _ in llm.create_chat_completion(messages(text), max_tokens=tokens, temperature=0.0, stream=True):
        first = first or time.perf_counter()
        count += 1
    end = time.perf_counter()
    return {"tokens": count, "rate": rate(first, end, count)}


def measure(model: Any, llamas: dict[str, Any] | None, genai: Any | None, tokens: int, runs: int) -> dict[str, Any]:
    from edgellm.params import GenerationParams

    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rep in range(runs + 1):  # repetition 0 warms up and is dropped
        report.stage(f"repetition {rep + 1}/{runs + 1}" + (" (warm-up)" if rep == 0 else ""))
        for kind, texts in PROMPTS.items():
            for i, text in enumerate(texts):
                ids = model.prompt_ids(messages(text), GenerationParams())
                order = ["off", "prompt_lookup"] if rep % 2 == 0 else ["prompt_lookup", "off"]
                for mode in order:
                    key = f"{kind}/{mode}"
                    got = {"edgellm": run_edgellm(model, text, tokens, mode)}
                    if llamas is not None:
                        got["llama.cpp"] = run_llama(llamas[mode], text, tokens)
                    if genai is not None:
                        got["genai"] = run_genai(genai, ids, tokens, mode)
                    if rep:
                        for engine, result in got.items():
                            rows.setdefault(f"{engine} {key}", {}).setdefault(str(i), []).append(result)
    return rows


def summarize(rows: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, per_prompt in rows.items():
        runs = [r for results in per_prompt.values() for r in results]
        out[key] = {"rate": statistics.median(r["rate"] for r in runs),
                    "tokens": statistics.median(r["tokens"] for r in runs)}
        if "drafted" in runs[0]:
            drafted = sum(r["drafted"] for r in runs)
            out[key]["acceptance"] = sum(r["accepted"] for r in runs) / drafted if drafted else None
    for engine, kind in ((e, k) for e in ("edgellm", "genai") for k in PROMPTS):
        plain, fast = rows.get(f"{engine} {kind}/off", {}), rows.get(f"{engine} {kind}/prompt_lookup", {})
        if not plain:
            continue
        same = [plain[i][0]["ids"] == fast[i][0]["ids"] for i in plain]
        parted = [next((j for j, (a, b) in enumerate(zip(plain[i][0]["ids"], fast[i][0]["ids"])) if a != b), None)
                  for i in plain]
        out[f"{engine} {kind}/identical"] = {"same": sum(same), "of": len(same), "parted_at": parted}
    return out


def ratio(summary: dict[str, Any], a: str, b: str) -> float | None:
    x, y = summary.get(a, {}).get("rate"), summary.get(b, {}).get("rate")
    return x / y if x and y else None


def bars(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        report._bar("quoting: prompt lookup >= 1.6x plain decode",
                    ratio(summary, "edgellm quoting/prompt_lookup", "edgellm quoting/off"), BAR_VS_PLAIN, True),
        report._bar("free text: prompt lookup >= 0.97x plain decode (it must not cost where it does not pay)",
                    ratio(summary, "edgellm free/prompt_lookup", "edgellm free/off"), 0.97, True),
        report._bar("quoting: edgellm prompt lookup >= 1.2x llama.cpp's",
                    ratio(summary, "edgellm quoting/prompt_lookup", "llama.cpp quoting/prompt_lookup"),
                    BAR_VS_LLAMA, True),
    ]


def table(summary: dict[str, Any]) -> str:
    lines = [f"{'engine / workload / speculation':44} {'tok/s':>8} {'tokens':>7} {'accepted':>9}"]
    for key, s in summary.items():
        if "rate" in s:
            acc = s.get("acceptance")
            lines.append(f"{key:44} {s['rate']:8.1f} {s['tokens']:7.0f} "
                         f"{'' if acc is None else f'{acc:8.0%}':>9}")
    for key, s in summary.items():
        if "same" in s:
            lines.append(f"{key}: greedy tokens identical in {s['same']}/{s['of']} prompts "
                         f"(first difference at token {s['parted_at']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="edgellm bundle (default: SmolLM2 exported by bench.py's recipe)")
    p.add_argument("--gguf", type=Path, help="GGUF for llama.cpp (default: the shipped SmolLM2 Q4_1)")
    p.add_argument("--genai", type=Path, help="onnxruntime-genai model folder (genai_build.py); none: no genai columns")
    p.add_argument("--tokens", type=int, default=96, help="max new tokens per answer")
    p.add_argument("--runs", type=int, default=4, help="measured repetitions (plus one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    import edgellm

    machine = report.machine_info()
    report.warn_if_busy(machine)
    bundle = ensure_bundle(args.bundle)
    report.stage(f"loading {bundle}")
    model = edgellm.load(bundle, threads=args.threads)
    gguf = args.gguf
    if gguf is None:
        from edgellm.export.sources import resolve_builtin

        gguf = Path(resolve_builtin("smollm2-135m"))
    llamas = llama_runners(gguf, args.threads)
    genai = genai_model(args.genai, args.threads)
    summary = summarize(measure(model, llamas, genai, args.tokens, args.runs))
    checks = bars(summary)
    results = {"machine": machine, "bundle": str(bundle), "gguf": str(gguf), "genai": args.genai and str(args.genai),
               "tokens": args.tokens, "runs": args.runs, "summary": summary, "bars": checks}
    report.emit(results, table(summary), report.bar_lines(checks), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Several prompts decoded together over cache slots, against the same prompts one at a time.

    python benchmarks/batch.py [--bundle DIR] [--tokens 64] [--runs 3] [--threads 2] [--levels 1,2,4,8] [--join]

For each level c, c different chat prompts run through `Model.generate_many(slots=c)` and,
in the same repetition, one after another through `Model.generate`; every request decodes
`--tokens` tokens (EOS ignored). The cache is reset before each set, not between its
requests, so both reuse the prefix the prompts share (the chat template's system turn):
one at a time in the single cache, together by copying it between slots. Aggregate
tokens/s is all completion tokens over the wall time of the whole set; "slowest" is the
batched set's wall time (when its last request finishes) over the sequential set's (when
the last one would finish in a queue). Levels and modes are interleaved within each
repetition and the table gives medians (the machine is shared).

`--join` measures the other side of sharing a board: 3 requests decode 96 tokens each and,
after their 16th token, a long prompt (about 1,500 tokens, a sensor log) joins. With the
scheduler's default prefill budget the long prompt is fed a 64-token piece per step between
the others' tokens; with the budget unbounded it is prefilled whole before their next token
(how the scheduler worked before). Reported: the decoding requests' longest gap between two
tokens, the long request's time to first token, and the wall time of the whole set.
Progress on stderr; the table on stdout.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from structured import ensure_bundle, load  # noqa: E402

QUESTIONS = [
    "Why does a bearing get hot?", "What does a PLC do in a factory?", "Explain a heat pump in two lines.",
    "How do I read a pressure gauge?", "Why would a conveyor motor draw more current?",
    "Give three tips for saving energy in a workshop.", "What is a thermocouple?", "When should a filter be changed?",
]


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def one_set(model: Any, level: int, tokens: int, batched: bool) -> tuple[int, float]:
    """(completion tokens, wall seconds) for `level` prompts, together or one at a time."""
    prompts = [chat(q) for q in QUESTIONS[:level]]
    params = dict(max_new_tokens=tokens, ignore_eos=True, temperature=0)
    model.reset()
    start = time.perf_counter()
    if batched:
        results = model.generate_many(prompts, slots=level, **params)
    else:
        results = [model.generate(prompt, **params) for prompt in prompts]
    return sum(r.usage.completion_tokens for r in results), time.perf_counter() - start


LOG = "Sensor log, line by line:\n" + "\n".join(
    f"{h:02d}:{m:02d} pump {m % 7} pressure {40 + (h * m) % 37} bar, motor {m % 5} current {3 + m % 4}.{m % 10} A"
    for h in range(6) for m in range(0, 60, 5)) + "\nWhich pump shows the highest pressure?"


def join(model: Any, budget: int | None, decoding: int = 3, tokens: int = 96, after: int = 16) -> dict[str, float]:
    """The decoding requests' longest gap between tokens while LOG joins, its TTFT, the wall time."""
    model.reset()
    scheduler = model.scheduler(decoding + 1)
    if budget is not None:
        scheduler.prefill_budget = budget
    params = dict(max_new_tokens=tokens, ignore_eos=True, temperature=0)
    for i, question in enumerate(QUESTIONS[:decoding]):
        scheduler.add(i, *model.request(chat(question), **params))
    seen: dict[Any, list[float]] = {i: [] for i in range(decoding + 1)}
    start = time.perf_counter()
    joined = None
    while scheduler.busy:
        for key, _ in scheduler.step():
            seen[key].append(time.perf_counter())
        if joined is None and min(len(seen[i]) for i in range(decoding)) >= after:
            joined = time.perf_counter()
            scheduler.add("log", *model.request(chat(LOG), **dict(params, max_new_tokens=8)), joined)
            seen["log"] = seen.pop(decoding)
    gaps = [b - a for i in range(decoding) for a, b in zip(seen[i], seen[i][1:]) if b > joined]
    return {"max_gap_s": max(gaps), "log_ttft_s": seen["log"][0] - joined, "wall_s": time.perf_counter() - start}


def join_table(model: Any, runs: int) -> None:
    prompt = len(model.request(chat(LOG))[0])
    rows: dict[str, list[dict[str, float]]] = {"64-token pieces between steps": [], "whole prompt at once": []}
    for run in range(runs):
        for label, budget in zip(rows, (None, 10**9)):
            report.stage(f"join run {run + 1}/{runs}: {label}")
            rows[label].append(join(model, budget))
    print(f"\nA {prompt}-token prompt joins 3 decoding requests (medians of {runs} runs)")
    print("| prefill | longest gap between the others' tokens | joining request's TTFT | wall of the set |")
    print("|---|---|---|---|")
    for label, got in rows.items():
        med = {k: statistics.median(r[k] for r in got) for k in got[0]}
        print(f"| {label} | {med['max_gap_s'] * 1000:.0f} ms | {med['log_ttft_s']:.2f} s | {med['wall_s']:.2f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--join", action="store_true", help="also time a long prompt joining decoding requests")
    args = ap.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    if max(levels) > len(QUESTIONS):
        raise SystemExit(f"--levels: at most {len(QUESTIONS)} prompts")
    report.warn_if_busy(report.machine_info())
    model = load(ensure_bundle(args.bundle), args.threads)
    if not model.manifest.graph.batch:
        raise SystemExit(f"{model.path}: exported without a batch dimension; re-export it")
    one_set(model, 2, 8, batched=True)  # warm-up: first runs pay for page faults and arena growth
    rates: dict[tuple[int, bool], list[float]] = {(c, b): [] for c in levels for b in (True, False)}
    walls: dict[tuple[int, bool], list[float]] = {(c, b): [] for c in levels for b in (True, False)}
    for run in range(args.runs):
        for c in levels:
            for batched in (run % 2 == 0, run % 2 == 1):
                report.stage(f"run {run + 1}/{args.runs}: {c} prompts {'together' if batched else 'one at a time'}")
                count, wall = one_set(model, c, args.tokens, batched)
                rates[c, batched].append(count / wall)
                walls[c, batched].append(wall)
    med = {key: statistics.median(v) for key, v in rates.items()}
    base = med[min(levels), False]
    print(f"{args.threads} threads, {args.tokens} tokens per request, medians of {args.runs} runs, {model.path.name}")
    print("| prompts | together tok/s | one at a time tok/s | together / one at a time | vs 1 prompt alone "
          "| slowest: together / queued wall |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        wall_ratio = statistics.median(walls[c, True]) / statistics.median(walls[c, False])
        print(f"| {c} | {med[c, True]:.1f} | {med[c, False]:.1f} | {med[c, True] / med[c, False]:.2f}x "
              f"| {med[c, True] / base:.2f}x | {wall_ratio:.2f} |")
    if args.join:
        join_table(model, args.runs)


if __name__ == "__main__":
    main()

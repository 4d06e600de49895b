"""What prompt privacy between tenants costs: the time to first token of a device that sends the
service's system prompt after another device asked, with that prompt declared shared or not.

    python benchmarks/privacy.py [--bundle DIR] [--system-tokens 200] [--runs 5] [--slots 1] [--threads 2]
                                 [--json PATH]

The common case of a fleet: many devices, one system prompt (`--system-tokens` long), each
device its own short question. Each case is one request, measured, after one request that
sets the cache up, both through the Engine as a front submits them (`--slots` as
`edgellm serve --slots`):

- same tenant: the device asked before with the same system prompt; its rows are reused in
  place (what every device got before prompts were private);
- other tenant, declared: another device asked before; the system prompt was declared shared
  (`--shared-system`), so its rows come back from their copy;
- other tenant, undeclared: another device asked before and nothing is declared; the whole
  prompt is prefilled, as for a cold cache.

Cases are interleaved within each run (the machine may be shared); the table gives medians and
each case's cached prompt tokens. Then batch-1 decode: `--decode-tokens` greedy tokens after a
short prompt, the tokens/s of the step loop that the reuse decision (once per request) leaves
alone; compare it with the code before by running this script there with `--decode-only`.
Progress on stderr; the table on stdout.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from prompts import filler  # noqa: E402
from structured import ensure_bundle, load  # noqa: E402

QUESTIONS = ["Is the boiler pressure normal?", "Which pump needs service first?", "Turn on the hall lights.",
             "What was the peak load today?", "Summarise the last alarm.", "When is the next filter change?"]
CASES = ("same tenant", "other tenant, declared", "other tenant, undeclared")


def ask(engine: Any, messages: list[dict[str, str]], tenant: str, tokens: int = 1) -> Any:
    """One request through `engine` as a front submits it; its usage."""
    from edgellm.engine import Job

    done, last = threading.Event(), []
    job = Job(messages, engine.params({"max_new_tokens": tokens, "ignore_eos": True}), client=tenant, on_chunk=lambda c: None,
              on_end=lambda outcome: (last.append(outcome), done.set()), tenant=tenant)
    if (refused := engine.submit(job)) is not None or not done.wait(600):
        raise SystemExit(f"the engine refused or never answered a request: {refused}")
    if last[0].error is not None:
        raise SystemExit(f"request failed: {last[0].error}")
    return last[0].last.usage


def privacy(bundle: Path, args: argparse.Namespace) -> dict[str, Any]:
    from edgellm.engine import Engine

    declared, plain = load(bundle, args.threads), load(bundle, args.threads)
    system = filler(plain.tokenizer, args.system_tokens, seed=7)
    shared = declared.share_prefix([{"role": "system", "content": system}])
    engines = {m: Engine(m, slots=args.slots).start() for m in (declared, plain)}
    seen: dict[str, dict[str, list[float]]] = {case: {"ttft_s": [], "cached": []} for case in CASES}
    try:
        for run in range(args.runs + 1):  # run 0 warms every path up and is not counted
            for i, case in enumerate(CASES):
                model = plain if case.endswith("undeclared") else declared
                first, second = (QUESTIONS[(run + i + k) % len(QUESTIONS)] for k in (0, 1))
                ask(engines[model], [{"role": "system", "content": system}, {"role": "user", "content": first}],
                    "device-a")
                usage = ask(engines[model], [{"role": "system", "content": system},
                                             {"role": "user", "content": second}],
                            "device-a" if case == "same tenant" else f"device-{run}-{i}")
                if run:
                    seen[case]["ttft_s"].append(usage.ttft_s)
                    seen[case]["cached"].append(usage.cached_prompt_tokens)
            report.stage(f"run {run}/{args.runs}")
    finally:
        for engine in engines.values():
            engine.close()
    return {"shared_tokens": shared, "prompt_tokens": usage.prompt_tokens,
            "cases": {case: {"ttft_ms": [round(t * 1000, 2) for t in v["ttft_s"]],
                             "median_ttft_ms": round(statistics.median(v["ttft_s"]) * 1000, 2),
                             "cached_prompt_tokens": sorted(set(v["cached"]))} for case, v in seen.items()}}


def decode(bundle: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 tokens/s of `--decode-tokens` greedy tokens, `--runs` times, the Python API's path."""
    model = load(bundle, args.threads)
    rates = []
    for run in range(args.runs + 1):
        model.reset()
        usage = model.generate([{"role": "user", "content": QUESTIONS[run % len(QUESTIONS)]}],
                               max_new_tokens=args.decode_tokens, ignore_eos=True).usage
        if run:
            rates.append(usage.decode_tokens_per_s)
    return {"tokens": args.decode_tokens, "tokens_per_s": [round(r, 2) for r in rates],
            "median_tokens_per_s": round(statistics.median(rates), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="default: bench.py's SmolLM2 bundle, exported if missing")
    parser.add_argument("--system-tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-only", action="store_true", help="only batch-1 decode (runs on older code)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bundle = ensure_bundle(args.bundle)
    machine = report.machine_info()
    report.warn_if_busy(machine)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict[str, Any] = {"machine": machine, "settings": settings | {"bundle": str(bundle)}}
    lines = []
    if not args.decode_only:
        results["ttft"] = ttft = privacy(bundle, args)
        lines += [f"system prompt: {ttft['shared_tokens']} tokens shared of {ttft['prompt_tokens']}, "
                  f"--slots {args.slots}, {args.runs} runs", "",
                  f"{'case':<26} {'TTFT median':>12} {'cached tokens':>14}"]
        lines += [f"{case:<26} {v['median_ttft_ms']:>9.1f} ms {','.join(map(str, v['cached_prompt_tokens'])):>14}"
                  for case, v in ttft["cases"].items()]
        lines.append("")
    results["decode"] = rate = decode(bundle, args)
    lines.append(f"batch-1 decode, {rate['tokens']} tokens: median {rate['median_tokens_per_s']:.1f} tok/s "
                 f"({', '.join(map(str, rate['tokens_per_s']))})")
    report.emit(results, "\n".join(lines), "", args.json)


if __name__ == "__main__":
    main()

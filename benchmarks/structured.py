"""Decode speed under a JSON schema, json_object and a regex next to plain decode: issue 10's first bar.

    python benchmarks/structured.py [--bundle DIR] [--tokens 128] [--runs 5] [--threads 2] [--json out.json]

One process, one loaded model, one prompt. Each repetition runs every mode once, in
an order rotated per repetition, so a burst of other work on the machine lands on all
modes alike; the first repetition is a warm-up (it also compiles the grammars). Every
mode has the same `max_new_tokens`: plain decode ignores EOS and runs all of them; a
constrained one ends where its grammar does (EOS is allowed only where the output is
complete), so the tokens each actually generated are reported next to its rate. The
rate is `usage.decode_tokens_per_s` (tokens after the first over the time after the
first), a per-token step time that does not depend on how many tokens there were.
A last, untimed pass per mode wraps the runtime's step functions with timers and
says where a step's time goes (forward, grammar mask, grammar advance, the rest).
Progress goes to stderr; the table and PASS/FAIL lines to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from bench import HERE, run_measured  # noqa: E402

BAR = 0.95  # constrained decode tok/s over plain, same run
SOURCE = "smollm2-135m"
DEFAULT_BUNDLE = Path.home() / ".cache" / "edgellm-bench" / f"edgellm-{SOURCE}-int4"  # bench.py's

MESSAGES = [
    {"role": "system", "content": "You are the maintenance assistant of a bottling plant. You answer in JSON."},
    {"role": "user", "content": "Conveyor line 3 stopped twice this morning. Motor current went from 4.1 A to "
                                "6.8 A, bearing temperature reached 71 C, vibration is 9.2 mm/s. Write the "
                                "inspection report with every sensor reading you would check."},
]

# Nested, and long enough that a greedy answer fills most of the token budget.
SCHEMA = {
    "type": "object",
    "properties": {
        "line": {"type": "string", "maxLength": 24},
        "status": {"enum": ["running", "degraded", "stopped"]},
        "readings": {
            "type": "array", "minItems": 6, "maxItems": 10,
            "items": {
                "type": "object",
                "properties": {
                    "sensor": {"type": "string", "maxLength": 20},
                    "value": {"type": "number", "minimum": -50, "maximum": 500},
                    "unit": {"enum": ["C", "A", "bar", "rpm", "mm/s"]},
                    "alarm": {"type": "boolean"},
                },
                "required": ["sensor", "value", "unit", "alarm"],
                "additionalProperties": False,
            },
        },
        "actions": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 3},
    },
    "required": ["line", "status", "readings", "actions"],
    "additionalProperties": False,
}
REGEX = r"([0-2][0-9]:[0-5][0-9] (motor|pump|valve|fan) [1-9] (ok|warn|fault) -?[0-9]{1,3}\.[0-9]\n){6,10}"

# Each mode's extra generation parameters, and how to tell its output is what it promised.
MODES: dict[str, dict[str, Any]] = {
    "plain": {"ignore_eos": True},
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "inspection", "schema": SCHEMA, "strict": True}}},
    "regex": {"grammar": {"type": "regex", "value": REGEX}},
}


def valid(mode: str, text: str) -> bool:
    """Whether a complete output holds to its mode's constraint (plain text always does)."""
    try:
        if mode == "json_object":
            return isinstance(json.loads(text), dict)
        if mode == "json_schema":
            jsonschema.validate(json.loads(text), SCHEMA)
        if mode == "regex":
            return re.fullmatch(REGEX, text) is not None
        return True
    except (ValueError, jsonschema.ValidationError):  # JSONDecodeError is a ValueError
        return False


def ensure_bundle(bundle: Path | None) -> Path:
    """`bundle`, or bench.py's SmolLM2 bundle, exported the first time (about 20 s)."""
    if bundle is not None:
        if not (bundle / "manifest.json").is_file():
            raise SystemExit(f"{bundle}: no manifest.json (not a bundle written by `edgellm export`)")
        return bundle
    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        report.stage(f"edgellm export {SOURCE} -> {DEFAULT_BUNDLE}")
        flag = DEFAULT_BUNDLE.parent / "structured-export.json"
        DEFAULT_BUNDLE.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(HERE / "worker.py"), "export", str(flag), "--",
               SOURCE, "-o", str(DEFAULT_BUNDLE), "--quant", "int4", "--force"]
        rc = run_measured(cmd, heartbeat="still exporting")["rc"]
        flag.unlink(missing_ok=True)
        if rc != 0:
            raise SystemExit(f"edgellm export {SOURCE} failed (exit {rc}); see above")
    return DEFAULT_BUNDLE


def load(bundle: Path, threads: int | None) -> Any:
    import edgellm

    report.stage(f"loading {bundle}")
    return edgellm.load(bundle, threads=threads)


def run_once(model: Any, mode: str, tokens: int) -> dict[str, Any]:
    model.reset()  # every run prefills cold, so no mode inherits another's cache
    started = time.perf_counter()
    r = model.generate(MESSAGES, max_new_tokens=tokens, temperature=0.0, **MODES[mode])
    wall = time.perf_counter() - started
    u = r.usage
    return {"decode_tokens_per_s": u.decode_tokens_per_s, "completion_tokens": u.completion_tokens,
            "prompt_tokens": u.prompt_tokens, "ttft_s": u.ttft_s, "wall_s": wall, "finish_reason": r.finish_reason,
            "incomplete": r.incomplete, "valid": None if r.incomplete else valid(mode, r.text), "text": r.text}


def measure(model: Any, tokens: int, runs: int) -> dict[str, list[dict[str, Any]]]:
    """`runs` measured repetitions of every mode after one warm-up, interleaved."""
    names = list(MODES)
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
    for rep in range(runs + 1):
        order = names[rep % len(names):] + names[: rep % len(names)]
        report.stage(f"{'warm-up' if rep == 0 else f'repetition {rep}/{runs}'}: {', '.join(order)}")
        for mode in order:
            run = run_once(model, mode, tokens)
            if rep:
                out[mode].append(run)
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rate = statistics.median(r["decode_tokens_per_s"] for r in runs)
    return {
        "decode_tokens_per_s": rate,
        "best_tokens_per_s": max(r["decode_tokens_per_s"] for r in runs),
        "step_ms": 1000 / rate if rate else None,
        "completion_tokens": statistics.median(r["completion_tokens"] for r in runs),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "incomplete": sum(r["incomplete"] for r in runs),
        "invalid": sum(r["valid"] is False for r in runs),
        "spread": max(r["decode_tokens_per_s"] for r in runs) / min(r["decode_tokens_per_s"] for r in runs)
        if all(r["decode_tokens_per_s"] for r in runs) else None,
    }


# -- where a step's time goes (untimed pass) -----------------------------------------------


@contextlib.contextmanager
def timers() -> Iterator[dict[str, list[float]]]:
    """Wrap the runtime's per-step functions with timers for as long as the block runs.

    Seconds per call, by part; the forward counts one-token calls only (decode, not prefill)."""
    from edgellm.grammar import GrammarState
    from edgellm.sequence import Sequence
    from edgellm.session import Runner

    spent: dict[str, list[float]] = {"forward": [], "mask": [], "advance": [], "sample": [], "append": []}
    targets = [(Runner, "forward", "forward"), (GrammarState, "__call__", "mask"),
               (GrammarState, "advance", "advance"), (Sequence, "sample", "sample"), (Sequence, "append", "append")]

    def timed(fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(self: Any, *args: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(self, *args)
            finally:
                if part != "forward" or len(args[0]) == 1:
                    spent[part].append(time.perf_counter() - t)
        return wrapper

    saved = [(cls, name, cls.__dict__[name]) for cls, name, _ in targets]
    for cls, name, part in targets:
        setattr(cls, name, timed(cls.__dict__[name], part))
    try:
        yield spent
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def profile(model: Any, tokens: int) -> dict[str, dict[str, float]]:
    """Per decode step, ms: the forward, the grammar's mask (a processor, inside sampling),
    its advance (inside append), the sampler and other processors, and the rest of append
    (detokenizing, stop checks). `step` is 1000 / decode_tokens_per_s of the same run;
    `loop` is what is left of it (the generator, chunking, the wrappers themselves)."""
    out = {}
    for mode in MODES:
        report.stage(f"profiling {mode}")
        with timers() as spent:
            run = run_once(model, mode, tokens)
        steps = max(run["completion_tokens"] - 1, 1)

        def ms(part: str) -> float:
            # The first sampled token's sample/append/mask belong to the prefill side of the step count.
            return 1000 * sum(spent[part][1:]) / steps if spent[part] else 0.0

        parts = {"forward": 1000 * sum(spent["forward"]) / steps, "mask": ms("mask"), "advance": ms("advance")}
        parts["sampler"] = ms("sample") - parts["mask"]
        parts["append"] = ms("append") - parts["advance"]
        step = 1000 / run["decode_tokens_per_s"] if run["decode_tokens_per_s"] else 0.0
        out[mode] = {**parts, "step": step, "loop": step - sum(parts.values())}
    return out


# -- report ---------------------------------------------------------------------------------


def bars(modes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    plain = modes["plain"]["decode_tokens_per_s"]
    out = []
    for mode in MODES:
        if mode == "plain":
            continue
        ratio = modes[mode]["decode_tokens_per_s"] / plain if plain else None
        status = "SKIP" if ratio is None else "PASS" if ratio >= BAR else "FAIL"
        out.append({"name": f"decode under {mode} >= {BAR}x plain decode, same run", "status": status,
                    "value": ratio, "limit": BAR, "at_least": True, "unit": "x"})
    return out


def table(results: dict[str, Any]) -> str:
    modes, prof, s = results["modes"], results["profile"], results["settings"]
    plain = modes["plain"]["decode_tokens_per_s"]
    best = modes["plain"]["best_tokens_per_s"]
    head = ("mode", "tok/s", "step ms", "vs plain", "best tok/s", "best vs best", "tokens", "wall s", "spread",
            "incomplete", "invalid")
    rows = [head]
    for name, m in modes.items():
        rows.append((name, f"{m['decode_tokens_per_s']:.1f}", f"{m['step_ms']:.2f}",
                     f"{m['decode_tokens_per_s'] / plain:.3f}x", f"{m['best_tokens_per_s']:.1f}",
                     f"{m['best_tokens_per_s'] / best:.3f}x", f"{m['completion_tokens']:.0f}",
                     f"{m['wall_s']:.2f}", f"{m['spread']:.2f}x" if m["spread"] else "—",
                     f"{m['incomplete']}/{s['runs']}", f"{m['invalid']}/{s['runs']}"))
    parts = ("forward", "mask", "advance", "sampler", "append", "loop", "step")
    rows += [(), ("ms per step", *parts)]
    rows += [(name, *(f"{p[k]:.3f}" for k in parts)) for name, p in prof.items()]
    lines = aligned(rows)
    threads = s["threads"] or "the profile's"
    lines.append(f"({s['tokens']} max new tokens, greedy, {threads} threads, median of "
                 f"{s['runs']} interleaved repetitions after a warm-up; best: the fastest run, the least disturbed "
                 "by other work; plain ignores EOS, constrained modes end where their grammar does; spread: fastest "
                 "over slowest run; the step table is one extra run per mode with timers, for diagnosis)")
    return "\n".join(lines)


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, a rule under the first row; an empty row stays a blank line."""
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options every script here shares: which bundle, how many threads, where the JSON goes."""
    p.add_argument("--bundle", type=Path,
                   help=f"bundle to use (default: {DEFAULT_BUNDLE}, exported from {SOURCE} when missing)")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: the device profile's)")
    p.add_argument("--json", type=Path, help="write the raw results here")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--tokens", type=int, default=128, help="max new tokens per run, every mode (default 128)")
    p.add_argument("--runs", type=int, default=5, help="measured repetitions after one warm-up (default 5)")
    args = p.parse_args(argv)
    if args.tokens < 2 or args.runs < 1:
        p.error("--tokens must be at least 2 and --runs at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = report.machine_info()
    report.warn_if_busy(machine)
    bundle = ensure_bundle(args.bundle)
    model = load(bundle, args.threads)
    runs = measure(model, args.tokens, args.runs)
    modes = {m: summary(r) for m, r in runs.items()}
    results: dict[str, Any] = {
        "machine": {**machine, "load_average_end": os.getloadavg()[0]},
        "settings": {"bundle": str(bundle), "tokens": args.tokens, "runs": args.runs, "threads": args.threads,
                     "prompt_tokens": runs["plain"][0]["prompt_tokens"], "schema": SCHEMA, "regex": REGEX},
        "modes": modes,
        "runs": runs,
        "profile": profile(model, args.tokens),
    }
    results["bars"] = bars(modes)
    report.emit(results, table(results), report.bar_lines(results["bars"]), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode speed under a JSON schema, json_object and a regex next to plain decode: issue 10's first bar.

    python benchmarks/structured.py [--bundle DIR] [--tokens 128] [--runs 5] [--threads 2] [--json out.json]

One process, one loaded model, one prompt. Each repetition runs every mode once, in
an order rotated per repetition, so a burst of other work on the machine lands on all
modes alike; the first repetition is a warm-up (it also compiles the grammars). Every
mode has the same `max_new_tokens`: plain decode ignores EOS and runs all of them; a
constrained one ends where its grammar does (EOS is allowed only where the output is
complete), so the tokens each actually generated are reported next to its rate. The
bar's rate is `usage.decode_tokens_per_s` (tokens after the first over the time after
the first), a per-token pace that does not depend on how many tokens there were.
Two readings that other work on a shared machine moves less are printed next to it:
the lower quartile of all decode steps (timed from the stream), and an estimate built
from the median of each part of a step (forward, grammar mask, grammar advance,
sampler, the rest), timed in a few more runs with the runtime's step functions wrapped.
Progress goes to stderr; the tables and PASS/FAIL lines to stdout.
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
NOISY = 1.3  # fastest over slowest run of one mode beyond which a run is called unstable (as bench.py does)
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
    """One generation, streamed so that each step is timed as well as the whole."""
    model.reset()  # every run prefills cold, so no mode inherits another's cache
    started = time.perf_counter()
    chunks, steps, before = [], [], None
    for chunk in model.stream(MESSAGES, max_new_tokens=tokens, temperature=0.0, **MODES[mode]):
        now = time.perf_counter()
        chunks.append(chunk)
        # Chunks between the first (which carries the prefill) and the last: k tokens in
        # `now - before` seconds are k steps of that length.
        if before is not None and chunk.finish_reason is None:
            steps += [(now - before) / len(chunk.token_ids)] * len(chunk.token_ids)
        before = now
    wall = time.perf_counter() - started
    last, text = chunks[-1], "".join(c.text for c in chunks)
    u = last.usage
    return {"decode_tokens_per_s": u.decode_tokens_per_s, "completion_tokens": u.completion_tokens,
            "step_ms": [round(1000 * t, 4) for t in steps],
            "prompt_tokens": u.prompt_tokens, "ttft_s": u.ttft_s, "wall_s": wall, "finish_reason": last.finish_reason,
            "incomplete": last.incomplete, "valid": None if last.incomplete else valid(mode, text), "text": text}


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
    rates = [r["decode_tokens_per_s"] for r in runs]
    steps = [t for r in runs for t in r["step_ms"]]
    return {
        "decode_tokens_per_s": statistics.median(rates),
        "best_tokens_per_s": max(rates),
        # Other work on the machine only ever slows a step: the fastest quarter is the model's own pace.
        "q1_step_ms": statistics.quantiles(steps, n=4)[0] if len(steps) > 1 else None,
        "completion_tokens": statistics.median(r["completion_tokens"] for r in runs),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "incomplete": sum(r["incomplete"] for r in runs),
        "invalid": sum(r["valid"] is False for r in runs),
        "spread": max(rates) / min(rates) if min(rates) > 0 else None,
    }


# -- where a step's time goes (untimed pass) -----------------------------------------------


@contextlib.contextmanager
def timers() -> Iterator[dict[str, list[float]]]:
    """Wrap the runtime's per-step functions with timers for as long as the block runs.

    Seconds per call, by part; the forward counts one-token calls only (decode, not prefill)."""
    from edgellm.grammar import GrammarState
    from edgellm.sequence import Sequence
    from edgellm.runtime.runner import Runner

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


PARTS = ("forward", "mask", "advance", "sampler", "append")


def profile(model: Any, tokens: int, runs: int = 3) -> dict[str, Any]:
    """Where a decode step's time goes, from `runs` more runs per mode with timers: the
    one-token forward, the grammar's mask (a processor, inside sampling), its advance
    (inside append), the sampler and other processors, and the rest of append
    (detokenizing, stop checks); medians per step, in ms.

    The forward does not depend on the mode, so the bar's ratio is estimated as
    (forward + plain's overhead) / (forward + the mode's), with one forward for all: the
    lower quartile of every mode's forwards, the pace other work on the machine did not slow."""
    calls: dict[str, dict[str, list[float]]] = {mode: {part: [] for part in PARTS} for mode in MODES}
    for rep in range(runs):
        report.stage(f"profiling every mode with timers, {rep + 1}/{runs}")
        for mode in MODES:
            with timers() as spent:
                run_once(model, mode, tokens)
            c = calls[mode]
            # Per step: sample and mask, append and advance are called once each (no grammar: zero).
            mask = spent["mask"] or [0.0] * len(spent["sample"])
            advance = spent["advance"] or [0.0] * len(spent["append"])
            c["forward"] += spent["forward"]
            c["mask"] += mask
            c["advance"] += advance
            c["sampler"] += [a - b for a, b in zip(spent["sample"], mask)]
            c["append"] += [a - b for a, b in zip(spent["append"], advance)]
    forward = 1000 * statistics.quantiles([t for c in calls.values() for t in c["forward"]], n=4)[0]
    modes = {}
    for mode, c in calls.items():
        parts = {part: 1000 * statistics.median(c[part]) for part in PARTS}
        modes[mode] = {**parts, "overhead": sum(parts.values()) - parts["forward"]}
    for p in modes.values():
        p["estimated_ratio"] = (forward + modes["plain"]["overhead"]) / (forward + p["overhead"])
    return {"forward_q1_ms": forward, "modes": modes}


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
    plain = modes["plain"]

    def vs(value: float | None, base: float | None) -> str:
        return f"{value / base:.3f}x" if value and base else "—"

    head = ("mode", "tok/s", "vs plain", "best tok/s", "vs plain", "q1 step ms", "vs plain", "tokens", "wall s",
            "spread", "incomplete", "invalid")
    rows = [head]
    for name, m in modes.items():
        rate, step = m["decode_tokens_per_s"], m["q1_step_ms"]
        rows.append((name, f"{rate:.1f}", vs(rate, plain["decode_tokens_per_s"]),
                     f"{m['best_tokens_per_s']:.1f}", vs(m["best_tokens_per_s"], plain["best_tokens_per_s"]),
                     "—" if step is None else f"{step:.2f}", vs(plain["q1_step_ms"], step),
                     f"{m['completion_tokens']:.0f}", f"{m['wall_s']:.2f}",
                     f"{m['spread']:.2f}x" if m["spread"] else "—", f"{m['incomplete']}/{s['runs']}",
                     f"{m['invalid']}/{s['runs']}"))
    rows += [(), ("median ms per step", *PARTS, "overhead", "est. vs plain")]
    rows += [(name, *(f"{p[k]:.3f}" for k in (*PARTS, "overhead")), f"{p['estimated_ratio']:.3f}x")
             for name, p in prof["modes"].items()]
    lines = aligned(rows)
    threads = s["threads"] or "the profile's"
    lines.append(f"({s['tokens']} max new tokens, greedy, {threads} threads, {s['runs']} interleaved repetitions "
                 "after a warm-up. tok/s: median of usage.decode_tokens_per_s (the bar); best: the fastest run; "
                 "q1 step: the lower quartile of every decode step of every run, the pace other work on the machine "
                 "did not slow; 'vs plain' is a rate ratio, > 1 faster. Plain ignores EOS, constrained modes end "
                 "where their grammar does; spread: fastest run over slowest. The second table times each part of "
                 f"a step in {s['profile_runs']} more runs per mode; overhead: all but the forward; est. vs plain: "
                 f"(F + plain's overhead) / (F + this one's), F = {prof['forward_q1_ms']:.2f} ms, the lower quartile "
                 "of all forwards: the bar's ratio at the machine's quiet pace)")
    if noisy := [name for name, m in modes.items() if m["spread"] and m["spread"] > NOISY]:
        lines.append(f"(unstable: {', '.join(noisy)} runs differ by more than {NOISY}x: the machine was busy and "
                     "the medians above are not the engine's; rerun on a quiet machine, or read the q1 and "
                     "per-part ratios)")
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
    p.add_argument("--profile-runs", type=int, default=3, help="runs per mode with per-part timers (default 3)")
    args = p.parse_args(argv)
    if args.tokens < 2 or args.runs < 1 or args.profile_runs < 1:
        p.error("--tokens must be at least 2, --runs and --profile-runs at least 1")
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
                     "profile_runs": args.profile_runs, "prompt_tokens": runs["plain"][0]["prompt_tokens"],
                     "schema": SCHEMA, "regex": REGEX},
        "modes": modes,
        "runs": runs,
        "profile": profile(model, args.tokens, args.profile_runs),
    }
    results["bars"] = bars(modes)
    report.emit(results, table(results), report.bar_lines(results["bars"]), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

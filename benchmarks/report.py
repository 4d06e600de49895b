"""Turning raw measurements into ratios, a table and PASS/FAIL lines against the issues' bars.

Numbers are only comparable inside one run on one machine, so every bar is a
ratio against a peer or against edgellm itself, except the absolute memory and
export budgets of the product brief.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

PEERS = {"genai": "onnxruntime-genai", "llamacpp": "llama.cpp"}
LABELS = {"edgellm": "edgellm", "edgellm-requant": "edgellm --requantize", **PEERS}
MB = 1e6

# The bars set in the issues.
BARS = {
    "decode_vs_genai": 1.0,
    "long_vs_short": 0.8,
    "cached_vs_cold_ttft": 0.3,
    "peak_rss_mb": 300.0,
    "exact_vs_requant": 0.9,
    "ppl_ratio": 1.05,
    "export_s": 60.0,
    "export_rss_mb": 2000.0,
}


def stage(message: str) -> None:
    """A progress line on stderr; stdout carries only the table and the bars."""
    print(f"==> {message}", file=sys.stderr, flush=True)


def warn_if_busy(machine: dict[str, Any]) -> None:
    if machine["load_average_start"] > 0.5 * (machine["logical_cores"] or 1):
        stage(f"warning: load average {machine['load_average_start']:.1f} on {machine['logical_cores']} cores: "
              "this machine is busy, timings will not be representative")


def emit(results: dict[str, Any], table_text: str, bars_text: str, json_path: Any = None) -> None:
    """Print the table and the PASS/FAIL lines; write the raw results as JSON when asked."""
    print(table_text)
    print()
    print(bars_text)
    if json_path:
        json_path.write_text(json.dumps(results, indent=1) + "\n")
        stage(f"wrote {json_path}")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("edgellm", "onnxruntime", "onnxruntime-genai", "llama_cpp_python", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions,
        "load_average_start": os.getloadavg()[0],
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    return info


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def metrics(engine: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of one engine's result (None where not measured)."""
    if "short" not in engine:
        return {}
    short = engine["short"]["decode_tokens_per_s"]
    long = engine["long"]["decode_tokens_per_s"]
    cold = engine["prefix"]["cold"]["ttft_s"]
    cached = engine["prefix"]["cached"]["ttft_s"]
    return {
        "decode_short": short,
        "decode_long": long,
        "long_vs_short": _ratio(long, short),
        "ttft_cold_s": cold,
        "ttft_cached_s": cached,
        "cached_vs_cold_ttft": _ratio(cached, cold),
        "cached_prompt_tokens": engine["prefix"]["cached"]["cached_prompt_tokens"],
        "peak_rss_mb": engine["peak_rss_mb"],
    }


def ratios(engines: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """edgellm over each peer, per metric: > 1 is better for decode, < 1 for TTFT and RSS."""
    ours = metrics(engines.get("edgellm", {}))
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for key in PEERS:
        theirs = metrics(engines.get(key, {}))
        if ours and theirs:
            out[f"edgellm_vs_{key}"] = {
                m: _ratio(ours[m], theirs[m])
                for m in ("decode_short", "decode_long", "ttft_cold_s", "ttft_cached_s", "peak_rss_mb")
            }
    return out


def agreement(engines: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many of the first greedy tokens each peer shares with edgellm: a cheap check
    that the engines run the same model (int4 rounding may part them early, though)."""
    ours = engines.get("edgellm", {}).get("short", {}).get("first_ids")
    out = {}
    for key in PEERS:
        theirs = engines.get(key, {}).get("short", {}).get("first_ids")
        if ours and theirs:
            out[key] = shared_prefix(ours, theirs)
    return out


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def unstable(engines: dict[str, dict[str, Any]], limit: float = 1.3) -> list[str]:
    """Measurements whose runs disagree by more than `limit` (fastest over slowest):
    the sign of a machine busy with something else."""
    found = []
    for key, engine in engines.items():
        for label in ("short", "long"):
            rates = [r["decode_tokens_per_s"] for r in engine.get(label, {}).get("runs", [])]
            if len(rates) > 1 and min(rates) > 0 and max(rates) / min(rates) > limit:
                found.append(f"{LABELS[key]} {label} decode {max(rates) / min(rates):.1f}x apart")
    return found


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def grid(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def table(results: dict[str, Any]) -> str:
    engines = results["engines"]
    head = ("engine", "tok/s short", "tok/s long", "long/short", "TTFT cold", "TTFT cached",
            "peak RSS", "perplexity", "vs genai", "vs llama.cpp")
    rows = [head]
    notes = []
    for key, engine in engines.items():
        if "skipped" in engine:
            notes.append(f"{LABELS[key]}: skipped: {engine['skipped']}")
            continue
        m = metrics(engine)
        vs = []
        for peer in PEERS:
            if peer == key:
                vs.append("1.00x")
                continue
            a, b = metrics(engine), metrics(engines.get(peer, {}))
            vs.append(_fmt(_ratio(a["decode_short"], b.get("decode_short")), ".2f", "x"))
        ppl = results["quality"].get(key, {}).get("perplexity")
        rows.append((
            LABELS[key], _fmt(m["decode_short"], ".1f"), _fmt(m["decode_long"], ".1f"),
            _fmt(m["long_vs_short"], ".2f"), _fmt(m["ttft_cold_s"] * 1000, ".0f", " ms"),
            f"{m['ttft_cached_s'] * 1000:.0f} ms ({m['cached_prompt_tokens']:.0f} reused)",
            _fmt(m["peak_rss_mb"], ".0f", " MB"), _fmt(ppl, ".3f"), *vs,
        ))
    lines = grid(rows)
    s = results["settings"]
    lines.append(f"(decode: {s['tokens']} greedy tokens, EOS masked, {s['threads']} threads, median of "
                 f"{s['runs']}; prompts {s['prompt_tokens']['short']} / {s['prompt_tokens']['long']} tokens; "
                 f"TTFT: {s['prompt_tokens']['prefix']}-token requests sharing a system prompt; "
                 "'vs' columns: short-prompt decode rate, edgellm's row over the peer)")
    q = results["quality"]
    if "edgellm" in q and q["edgellm"].get("source_perplexity") is not None:
        lines.append(f"(perplexity on the export gate's {q.get('tokens')} tokens; edgellm's source (fp32 of the "
                     f"same weights): {q['edgellm']['source_perplexity']:.3f})")
    same = agreement(engines)
    if same:
        n = len(engines["edgellm"]["short"]["first_ids"])
        lines.append(f"(greedy tokens shared with edgellm, of the first {n} after the short prompt: "
                     + ", ".join(f"{LABELS[k]} {v}" for k, v in same.items()) + ")")
    if noisy := unstable(engines):
        lines.append("(unstable runs, rerun on a quiet machine: " + "; ".join(noisy) + ")")
    for name, e in results["export"].items():
        if "skipped" in e:
            lines.append(f"export {name}: skipped: {e['skipped']}")
        else:
            lines.append(f"export {name}: {e['wall_s']:.1f} s, peak RSS {e['peak_rss_mb']:.0f} MB, "
                         f"torch imported: {'yes' if e['torch_imported'] else 'no'}, exit {e['rc']}")
    return "\n".join(lines + notes)


def _bar(name: str, value: float | None, limit: float, at_least: bool, unit: str = "x") -> dict[str, Any]:
    if value is None:
        status = "SKIP"
    else:
        status = "PASS" if (value >= limit if at_least else value <= limit) else "FAIL"
    return {"name": name, "status": status, "value": value, "limit": limit, "at_least": at_least, "unit": unit}


def bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    ours = metrics(results["engines"].get("edgellm", {}))
    requant = metrics(results["engines"].get("edgellm-requant", {}))
    genai = metrics(results["engines"].get("genai", {}))
    vs_genai = results["ratios"].get("edgellm_vs_genai", {})
    q = results.get("quality", {}).get("edgellm", {})
    out = [
        _bar("edgellm decode (short prompt) >= 1.0x onnxruntime-genai", vs_genai.get("decode_short"),
             BARS["decode_vs_genai"], True),
        _bar("edgellm decode (long prompt) >= 1.0x onnxruntime-genai", vs_genai.get("decode_long"),
             BARS["decode_vs_genai"], True),
        _bar("edgellm long-context decode >= 0.8x short", ours.get("long_vs_short"), BARS["long_vs_short"], True),
        _bar("edgellm cached TTFT <= 0.3x cold", ours.get("cached_vs_cold_ttft"), BARS["cached_vs_cold_ttft"], False),
        _bar("edgellm peak RSS <= 300 MB", ours.get("peak_rss_mb"), BARS["peak_rss_mb"], False, " MB"),
        # genai's build re-quantizes, so --requantize is edgellm on the same weights.
        _bar("edgellm --requantize decode (short prompt) >= 1.0x onnxruntime-genai",
             _ratio(requant.get("decode_short"), genai.get("decode_short")), BARS["decode_vs_genai"], True),
        _bar("edgellm exact import decode (short prompt) >= 0.9x --requantize",
             _ratio(ours.get("decode_short"), requant.get("decode_short")), BARS["exact_vs_requant"], True),
        _bar("edgellm perplexity <= 1.05x its source", _ratio(q.get("perplexity"), q.get("source_perplexity")),
             BARS["ppl_ratio"], False),
    ]
    for name, e in results["export"].items():
        ok = "skipped" not in e and e["rc"] == 0
        out += [
            _bar(f"export {name} <= 60 s", e.get("wall_s") if ok else None, BARS["export_s"], False, " s"),
            _bar(f"export {name} peak RSS <= 2 GB", e.get("peak_rss_mb") if ok else None,
                 BARS["export_rss_mb"], False, " MB"),
            _bar(f"export {name} imports no torch", (0.0 if not e["torch_imported"] else 1.0) if ok else None,
                 0.0, False, ""),
        ]
    return out


def bar_lines(checks: list[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        if c["value"] is None:
            shown = "not measured"
        elif c["unit"] == "":
            shown = "torch imported" if c["value"] else "no torch"
        else:
            shown = f"{c['value']:.2f}{c['unit']}"
        lines.append(f"{c['status']:4}  {c['name']}  ({shown})")
    return "\n".join(lines)

"""edgellm against its peers, same model, same machine, one run: speed, memory, export, quality.

    python benchmarks/bench.py [--work DIR] [--threads 2] [--tokens 128] [--json out.json]

Exports the model with edgellm (timed), builds onnxruntime-genai's int4 model of the
same weights (cached under --work), then runs each engine in a process of its own
(see worker.py), prints a table and PASS/FAIL lines against the issues' bars, and
writes the raw numbers with machine info as JSON. Timings mean something only on a
quiet machine: the load average is recorded so a busy run can be recognised.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from prompts import PromptSet  # noqa: E402

HERE = Path(__file__).resolve().parent
ENGINES = ("edgellm", "edgellm-requant", "genai", "llamacpp")
MODULES = {"edgellm": "edgellm", "edgellm-requant": "edgellm", "genai": "onnxruntime_genai", "llamacpp": "llama_cpp"}
INSTALL = {"genai": "pip install onnxruntime-genai onnx-ir", "llamacpp": "pip install llama-cpp-python"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="smollm2-135m",
                   help="model to benchmark: a built-in name, a .gguf file or a HF folder (default smollm2-135m)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgellm-bench",
                   help="where bundles, peer models and run files go (peer models are reused)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128, help="greedy tokens per decode run")
    p.add_argument("--runs", type=int, default=3, help="measured runs per number (after one warm-up)")
    p.add_argument("--short", type=int, default=64, help="short prompt, tokens")
    p.add_argument("--long", type=int, default=2000, help="long prompt, tokens")
    p.add_argument("--system", type=int, default=200, help="shared system prompt, tokens")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--skip-export", action="store_true",
                   help="reuse the bundle from an earlier run instead of timing a fresh export")
    p.add_argument("--json", type=Path, help="write the raw results here")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        p.error(f"--engines: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ENGINES)})")
    return args


def run_measured(cmd: list[str], log: Path | None = None, heartbeat: str = "") -> dict[str, Any]:
    """Run `cmd` to the end; its wall time and peak RSS (wait4's, which counts this process's size
    at the fork too: worker.py reports the child's own)."""
    started = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out if log else None)
        next_beat = started + 15
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if heartbeat and time.perf_counter() > next_beat:
                report.stage(f"{heartbeat} ({time.perf_counter() - started:.0f} s)")
                next_beat += 15
            time.sleep(0.2)
    finally:
        if log:
            out.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss * 1024 / report.MB}


def _slug(source: str) -> str:
    return Path(source.rstrip("/")).stem.lower() if os.sep in source or "." in source else source


def gguf_of(source: str) -> Path | None:
    """The GGUF file behind `source`, which llama.cpp needs; None for a HF folder."""
    from edgellm.export.sources import BUILTIN_MODELS, resolve_builtin

    if source in BUILTIN_MODELS:
        return resolve_builtin(source)
    return Path(source) if source.lower().endswith(".gguf") else None


def export_edgellm(args: argparse.Namespace, bundle: Path) -> dict[str, Any]:
    """Time `edgellm export` with and without the perplexity gate; the gated bundle is the one benchmarked,
    and its `--requantize` twin (genai's kind of weights) when that row is asked for."""
    if args.skip_export and (bundle / "manifest.json").is_file():
        return {"default": {"skipped": "--skip-export (reused " + str(bundle) + ")"}}
    results = {}
    runs = [("default", bundle, []), ("--no-eval", args.work / ".export-no-eval", ["--no-eval"])]
    if "edgellm-requant" in args.engines:
        runs.append(("--requantize", requantized(bundle), ["--requantize"]))
    for name, out, extra in runs:
        report.stage(f"edgellm export {args.source} ({name}) -> {out}")
        flag = args.work / "run" / "edgellm.export.json"
        cmd = [sys.executable, str(HERE / "worker.py"), "export", str(flag), "--",
               args.source, "-o", str(out), "--quant", "int4", "--force", "--allow-quality-loss", *extra]
        measured = run_measured(cmd)
        done = json.loads(flag.read_text()) if flag.is_file() else {}
        flag.unlink(missing_ok=True)
        results[name] = {**measured, **done, "torch_imported": done.get("torch_imported")}
        if measured["rc"] != 0:
            raise SystemExit(f"bench: edgellm export {args.source} failed (exit {measured['rc']}); see above")
    shutil.rmtree(args.work / ".export-no-eval", ignore_errors=True)
    return results


def build_genai(source: Path, out: Path, log: Path) -> str | None:
    """Build (or reuse) genai's int4 model of `source` (a GGUF or HF folder) in `out`;
    a reason string when it cannot be had."""
    if (out / "genai_config.json").is_file():
        return None
    report.stage(f"building onnxruntime-genai int4 model from {source.name} (once; log: {log})")
    cmd = [sys.executable, str(HERE / "genai_build.py"), str(source), str(out)]
    if run_measured(cmd, log=log, heartbeat="still building the genai model")["rc"] != 0:
        shutil.rmtree(out, ignore_errors=True)
        return f"its model builder failed (see {log})"
    return None


def requantized(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + "-requantize")


def model_for(key: str, args: argparse.Namespace, bundle: Path, genai_dir: Path) -> tuple[Path | None, str | None]:
    if importlib.util.find_spec(MODULES[key]) is None:
        return None, f"{MODULES[key]} is not installed ({INSTALL[key]})"
    if key == "edgellm":
        return bundle, None
    if key == "edgellm-requant":
        ready = (requantized(bundle) / "manifest.json").is_file()
        return requantized(bundle), None if ready else "no --requantize bundle (run without --skip-export)"
    if key == "genai":
        source = gguf_of(args.source) or Path(args.source)
        return genai_dir, build_genai(source, genai_dir, args.work / "genai-build.log")
    gguf = gguf_of(args.source)
    return (gguf, None) if gguf else (None, "llama.cpp needs a GGUF source")


def workload(args: argparse.Namespace, bundle: Path) -> dict[str, Any]:
    """Every engine's inputs: the same prompts as text and ids, and the gate's eval ids."""
    from edgellm.runtime.bundle import read_manifest
    from edgellm.export.quality import DEFAULT_TEXT, MAX_EVAL_TOKENS

    spec = read_manifest(bundle, verify=False).spec
    prompts = PromptSet(bundle)
    short, long = prompts.plain(args.short, seed=1), prompts.plain(args.long, seed=2)
    pairs = [prompts.shared_prefix(args.system, run) for run in range(args.runs + 1)]
    context = max(len(long.ids), *(len(p.ids) for pair in pairs for p in pair)) + args.tokens + 8
    if context > spec.max_context:
        raise SystemExit(f"bench: --long {args.long} plus --tokens {args.tokens} needs {context} tokens of context; "
                         f"{args.source} has {spec.max_context}")
    return {
        "threads": args.threads, "tokens": args.tokens, "runs": args.runs, "context": context,
        "prompts": {"short": short.to_dict(), "long": long.to_dict()},
        "prefix": [[a.to_dict(), b.to_dict()] for a, b in pairs],
        "eval_ids": prompts.eval_ids(DEFAULT_TEXT, min(MAX_EVAL_TOKENS, spec.max_context)),
    }


def measure(key: str, model: Path, work: dict[str, Any], run_dir: Path) -> tuple[dict[str, Any], dict | None]:
    """One engine's speed numbers (its own process) and, for a peer, its perplexity (another)."""
    config = run_dir / f"{key}.config.json"
    config.write_text(json.dumps({**work, "engine": key, "model": str(model)}))
    report.stage(f"{report.LABELS[key]}: measuring in its own process")
    speed = run_dir / f"{key}.speed.json"
    measured = run_measured([sys.executable, str(HERE / "worker.py"), "speed", str(config), str(speed)])
    if measured["rc"] != 0:
        return {"skipped": f"its benchmark process failed (exit {measured['rc']}; see above)"}, None
    result = {**measured, **json.loads(speed.read_text())}  # the worker's own peak RSS wins
    if key.startswith("edgellm"):  # its perplexity is the export gate's, in the manifest
        return result, None
    scores = run_dir / f"{key}.quality.json"
    if run_measured([sys.executable, str(HERE / "worker.py"), "quality", str(config), str(scores)])["rc"] != 0:
        report.stage(f"{report.LABELS[key]}: perplexity run failed; left out")
        return result, None
    return result, json.loads(scores.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = args.work / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    machine = report.machine_info()
    report.warn_if_busy(machine)
    slug = _slug(args.source)
    bundle = args.work / f"edgellm-{slug}-int4"
    exported = export_edgellm(args, bundle)
    work = workload(args, bundle)

    from edgellm.runtime.bundle import read_manifest

    quality: dict[str, Any] = {"text": "edgellm.export.quality.DEFAULT_TEXT", "tokens": len(work["eval_ids"])}
    for key, path in (("edgellm", bundle), ("edgellm-requant", requantized(bundle))):
        if key in args.engines and (path / "manifest.json").is_file():
            gate = read_manifest(path, verify=False).quality
            quality[key] = {k: gate.get(k) for k in ("perplexity", "source_perplexity", "tokens")}
    engines: dict[str, dict[str, Any]] = {}
    for key in args.engines:
        model, skipped = model_for(key, args, bundle, args.work / f"genai-{slug}-int4")
        if skipped:
            report.stage(f"{report.LABELS[key]}: skipped: {skipped}")
            engines[key] = {"skipped": skipped}
            continue
        engines[key], scores = measure(key, model, work, run_dir)
        if scores:
            quality[key] = scores

    prompt = work["prompts"]
    results: dict[str, Any] = {
        "machine": {**machine, "load_average_end": os.getloadavg()[0]},
        "settings": {
            "source": args.source, "threads": args.threads, "tokens": args.tokens, "runs": args.runs,
            "context": work["context"], "weights": "int4",
            "prompt_tokens": {"short": len(prompt["short"]["ids"]), "long": len(prompt["long"]["ids"]),
                              "prefix": len(work["prefix"][0][0]["ids"]), "system": args.system},
        },
        "export": exported,
        "quality": quality,
        "engines": engines,
    }
    results["ratios"] = report.ratios(engines)
    results["agreement"] = report.agreement(engines)
    results["unstable"] = report.unstable(engines)
    results["bars"] = report.bars(results)
    report.emit(results, report.table(results), report.bar_lines(results["bars"]), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""OpenVINO against the CPU provider: today's cpu bundle and the --target openvino bundle on each.

    python benchmarks/openvino.py --ov-python /tmp/ovenv/bin/python [--source smollm2-135m] [--work DIR]
        [--threads 2] [--tokens 64] [--prompt 200] [--rounds 3] [--ov-option precision=FP32] [--json out.json]

Rows, each in its own process (a fresh session, as a service starting):
  (a)  the default cpu bundle (GroupQueryAttention, int8 KV) on the CPU provider of this Python's onnxruntime;
  (a') the cpu bundle with a float32 KV cache, on the same: the bundle (c) runs, since onnxruntime-openvino
       1.24 predates the int8 GroupQueryAttention cache;
  (b)  the --target openvino bundle on the CPU provider;
  (c)  (a')'s bundle on OpenVINO (--ov-python: a Python whose onnxruntime has OpenVINOExecutionProvider);
  (d)  the openvino bundle on OpenVINO.
OpenVINO rows open their session with CPU fallback disabled (session.disable_cpu_ep_fallback), so
a row that opens at all ran every node on OpenVINO; (c) cannot, and is opened with fallback to say
how much the split costs. Each row prefills the same ~`--prompt`-token chat prompt, then decodes
`--tokens` greedy tokens; TTFT is the prefill to the first token (the first request of the process,
and the median of later cold ones), decode the median step. `--rounds` repetitions interleave the
rows (the machine is shared); the table gives medians and speeds against (a). Bars: (d) decodes at
>= 1.0x (a), with the greedy tokens of the same bundle on the CPU provider (b).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402

CPU, OPENVINO = "CPUExecutionProvider", "OpenVINOExecutionProvider"
# row -> (bundle, provider)
ROWS = {"a": ("cpu", CPU), "a'": ("cpu-f32kv", CPU), "b": ("openvino", CPU), "c": ("cpu-f32kv", OPENVINO),
        "d": ("openvino", OPENVINO)}
EXPORTS = {"cpu": {}, "cpu-f32kv": {"kv_cache": "float32"}, "openvino": {"target": "openvino"}}


def worker(args: argparse.Namespace) -> None:
    """One row: open the session, then time cold prefills and greedy decoding; JSON on stdout."""
    import numpy as np
    import onnxruntime as ort

    from edgellm.runtime.bundle import read_manifest
    from edgellm.runtime.caches import cache_for
    from edgellm.runtime.providers import session_options
    from edgellm.runtime.runner import Runner, prefill

    manifest = read_manifest(args.bundle, verify=False)
    ids = json.loads(args.ids.read_text())
    options = session_options(args.threads)
    entry: Any = CPU
    whole = None  # the CPU provider's rows: nothing to fall back from
    if args.provider == OPENVINO:
        entry = (OPENVINO, {"device_type": "CPU", "num_of_threads": str(args.threads),
                            **dict(o.split("=", 1) for o in args.ov_option)})
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(str(args.bundle / manifest.graph.file), options, providers=[entry])
        whole = True if args.provider == OPENVINO else None
    except Exception:  # noqa: BLE001 - some node needs the CPU provider: open with it, and say so
        options = session_options(args.threads)
        session = ort.InferenceSession(str(args.bundle / manifest.graph.file), options, providers=[entry, CPU])
        whole = False
    load = time.perf_counter() - start
    spec = manifest.spec
    cache = cache_for(manifest.graph, spec, len(ids) + args.tokens + 8)
    runner = Runner(session, cache, kind="fast")
    ttft, steps, tokens = [], [], []
    for _ in range(2):
        runner.rewind(0)
        begin = time.perf_counter()
        tokens = [int(np.argmax(prefill(runner.forward, ids)))]
        ttft.append(time.perf_counter() - begin)
        for _ in range(args.tokens - 1):
            begin = time.perf_counter()
            tokens.append(int(np.argmax(runner.forward([tokens[-1]]))))
            steps.append(time.perf_counter() - begin)
    print(json.dumps({"load_s": load, "ttft_first_ms": 1e3 * ttft[0], "ttft_ms": 1e3 * ttft[1],
                      "decode_ms": 1e3 * statistics.median(steps), "tokens": tokens, "every_node": whole,
                      "providers": session.get_providers(), "onnxruntime": ort.__version__}))


def export_bundles(source: str, work: Path) -> dict[str, dict[str, Any]]:
    """The three bundles under `work`, exported (with the perplexity gate) when missing."""
    from edgellm.runtime.bundle import read_manifest
    from edgellm.export.api import export_model
    from edgellm.export.config import QuantConfig

    out = {}
    for name, quant in EXPORTS.items():
        path = work / name
        if not (path / "manifest.json").is_file():
            report.stage(f"edgellm export {source} -> {path} ({quant or 'defaults'})")
            export_model(source, path, quant=QuantConfig(**quant), force=True)
        manifest = read_manifest(path, verify=False)
        out[name] = {"path": str(path), "quality": manifest.quality, "kv_dtype": manifest.graph.kv_dtype}
    return out


def run_row(python: str, bundle: str, provider: str, ids: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "worker", "--bundle", bundle, "--provider", provider,
           "--ids", str(ids), "--threads", str(args.threads), "--tokens", str(args.tokens),
           *[f"--ov-option={o}" for o in args.ov_option]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    if errors := [r["error"] for r in runs if "error" in r]:
        return {"error": errors[0]}
    keys = ("load_s", "ttft_first_ms", "ttft_ms", "decode_ms")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["decode_best_ms"] = min(r["decode_ms"] for r in runs)  # the round nearest a quiet machine
    out.update({k: runs[0][k] for k in ("tokens", "every_node", "providers", "onnxruntime")})
    out["same_tokens_every_round"] = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    return out


def table(results: dict[str, Any]) -> tuple[str, str]:
    from structured import aligned  # jsonschema: not in the OpenVINO Python the workers run

    rows = results["rows"]
    base = rows["a"]
    if "error" in base:
        return f"(a), the base of every ratio, failed: {base['error']}", ""
    header = ("row", "bundle", "provider", "every node", "load s", "TTFT first", "TTFT ms", "decode ms/tok",
              "best", "decode vs (a)", "best vs best", "TTFT vs (a)", "tokens = (a)", "tokens = its bundle on CPU")
    lines = [header]
    for key, (bundle, provider) in ROWS.items():
        if key not in rows:
            continue
        r = rows[key]
        if "error" in r:
            lines.append((f"({key})", bundle, provider, "-", r["error"][:80]))
            continue
        on_cpu = rows.get("b" if bundle == "openvino" else "a'", {"error": "not run"})
        same = "-" if "error" in on_cpu else _agree(r["tokens"], on_cpu["tokens"])
        lines.append((f"({key})", bundle, provider.removesuffix("ExecutionProvider"),
                      {True: "yes", False: "no", None: "-"}[r["every_node"]], f"{r['load_s']:.1f}",
                      f"{r['ttft_first_ms']:.0f}", f"{r['ttft_ms']:.0f}", f"{r['decode_ms']:.1f}",
                      f"{r['decode_best_ms']:.1f}", f"{base['decode_ms'] / r['decode_ms']:.2f}x",
                      f"{base['decode_best_ms'] / r['decode_best_ms']:.2f}x", f"{base['ttft_ms'] / r['ttft_ms']:.2f}x",
                      _agree(r["tokens"], base["tokens"]), same))
    text = "\n".join(aligned(lines))
    quality = [f"{name}: perplexity {b['quality']['perplexity']:.3f} vs source {b['quality']['source_perplexity']:.3f} "
               f"({b['quality']['perplexity'] / b['quality']['source_perplexity']:.3f}x), kv {b['kv_dtype']}"
               for name, b in results["bundles"].items() if b.get("quality")]
    d, b = rows.get("d", {"error": "not run"}), rows.get("b", {"error": "not run"})
    checks = []
    if "error" not in d and "error" not in base:
        checks.append(report._bar("(d) decode >= 1.0x (a)", base["decode_ms"] / d["decode_ms"], 1.0, True))
    results["bars"] = checks
    lines = [report.bar_lines(checks)]
    if "error" not in d:
        lines.append(f"{'PASS' if d['every_node'] else 'FAIL'}  (d) every node on OpenVINO (CPU fallback disabled)")
    if "error" not in d and "error" not in b:
        lines.append(f"{'PASS' if d['tokens'] == b['tokens'] else 'FAIL'}  (d) greedy tokens = (b), the same bundle "
                     f"on the CPU provider ({_agree(d['tokens'], b['tokens'])})")
    return text + "\n\n" + "\n".join(quality), "\n".join(lines)


def _agree(tokens: list[int], ref: list[int]) -> str:
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))
    return "all" if tokens == ref else f"first {same}/{len(ref)}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per run (default 64)")
    p.add_argument("--ov-option", action="append", default=[],
                   help="KEY=VALUE for OpenVINOExecutionProvider (repeatable), e.g. precision=FP32")
    if argv[:1] == ["worker"]:
        p.add_argument("--bundle", type=Path, required=True)
        p.add_argument("--provider", required=True)
        p.add_argument("--ids", type=Path, required=True)
        worker(p.parse_args(argv[1:]))
        return 0
    p.add_argument("--ov-python", required=True, help="a Python whose onnxruntime has OpenVINOExecutionProvider "
                   "(pip install onnxruntime-openvino: it replaces the onnxruntime wheel, so a venv of its own)")
    p.add_argument("--source", default="smollm2-135m", help="what to export (default: the built-in SmolLM2)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgellm-bench" / "openvino")
    p.add_argument("--prompt", type=int, default=200, help="prompt tokens (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="repetitions of every row, interleaved (default 3)")
    p.add_argument("--rows", default=",".join(ROWS), help="which rows, comma-separated (default: all; a is "
                   "always run, the base of every ratio)")
    p.add_argument("--json", type=Path, help="write the raw results here")
    args = p.parse_args(argv)
    from prompts import PromptSet

    machine = report.machine_info()
    report.warn_if_busy(machine)
    bundles = export_bundles(args.source, args.work)
    ids_path = args.work / "prompt.json"
    ids_path.write_text(json.dumps(PromptSet(Path(bundles["cpu"]["path"])).plain(args.prompt).ids))
    chosen = ["a"] + [key for key in args.rows.split(",") if key in ROWS and key != "a"]
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in chosen}
    for round_ in range(args.rounds):
        for key in chosen:
            bundle, provider = ROWS[key]
            report.stage(f"round {round_ + 1}/{args.rounds}: ({key}) {bundle} on {provider}")
            python = args.ov_python if provider == OPENVINO else sys.executable
            runs[key].append(run_row(python, bundles[bundle]["path"], provider, ids_path, args))
    machine["load_average_end"] = os.getloadavg()[0]
    results = {"machine": machine, "bundles": bundles, "threads": args.threads, "tokens": args.tokens,
               "prompt_tokens": len(json.loads(ids_path.read_text())), "ov_options": args.ov_option,
               "rows": {key: summarize(r) for key, r in runs.items()}, "runs": runs}
    text, bar_text = table(results)
    report.emit(results, text, bar_text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

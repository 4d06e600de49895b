"""One engine's measurements, in a process of its own so its peak RSS is its alone.

    python benchmarks/worker.py speed|quality CONFIG.json OUT.json
    python benchmarks/worker.py export OUT.json -- EDGELLM-EXPORT-ARGS...

`speed`: decode rate with a short and (when given) a long prompt, then (when given) TTFT
of a cold request and of a second one sharing its system prompt; a warm-up run, then the
median of N.
`quality`: the engine's perplexity on the export gate's token ids (a separate process,
because full-sequence logits would inflate the speed run's peak RSS).
`export`: runs `edgellm export` and records whether torch was imported on the way.
Progress goes to stderr; the result is one JSON file, with the process's own peak RSS.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engines import ENGINES, Engine, Run  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak resident set since it started (VmHWM; mapped file pages count).
    Not wait4's ru_maxrss: that keeps the parent's size at the fork, so a worker started by a
    process that built a 1B model would read as big as its parent."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    import resource  # elsewhere the fork's caveat stands

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def _say(name: str, message: str) -> None:
    print(f"  {name}: {message}", file=sys.stderr, flush=True)


def _summary(runs: list[Run]) -> dict[str, Any]:
    return {
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
        "ttft_s": statistics.median(r.ttft_s for r in runs),
        "prompt_tokens": runs[0].prompt_tokens,
        "cached_prompt_tokens": statistics.median(r.cached_prompt_tokens for r in runs),
        "completion_tokens": len(runs[0].token_ids),
        "runs": [{k: v for k, v in asdict(r).items() if k != "token_ids"} for r in runs],
        "first_ids": runs[0].token_ids[:16],
    }


def decode_runs(engine: Engine, prompt: dict, tokens: int, runs: int) -> dict[str, Any]:
    done = []
    for i in range(runs + 1):
        _say(engine.name, f"{len(prompt['ids'])}-token prompt, {'warm-up' if i == 0 else f'run {i}/{runs}'}")
        engine.reset()
        done.append(engine.generate(prompt["text"], prompt["ids"], tokens))
    return _summary(done[1:])


def prefix_runs(engine: Engine, pairs: list[list[dict]]) -> dict[str, Any]:
    """Each pair is a fresh system prompt: request A fills the cache, B shares its prefix."""
    cold, cached = [], []
    for i, (a, b) in enumerate(pairs):
        _say(engine.name, f"shared-prefix pair, {'warm-up' if i == 0 else f'run {i}/{len(pairs) - 1}'}")
        engine.reset()
        first = engine.generate(a["text"], a["ids"], 1)
        second = engine.generate(b["text"], b["ids"], 1)
        if i:
            cold.append(first)
            cached.append(second)
    return {"cold": _summary(cold), "cached": _summary(cached)}


def speed(config: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    engine = ENGINES[config["engine"]](Path(config["model"]), config["threads"], config["context"])
    loaded = time.perf_counter() - started
    _say(engine.name, f"loaded in {loaded:.1f} s")
    tokens, runs = config["tokens"], config["runs"]
    result = {"load_s": loaded, "short": decode_runs(engine, config["prompts"]["short"], tokens, runs)}
    # The long prompt and the shared-prefix pairs are optional (deploy_shapes.py times the short one only).
    if "long" in config["prompts"]:
        result["long"] = decode_runs(engine, config["prompts"]["long"], tokens, runs)
    if config.get("prefix"):
        result["prefix"] = prefix_runs(engine, config["prefix"])
    return result


def quality(config: dict[str, Any]) -> dict[str, Any]:
    ids = config["eval_ids"]
    kind = ENGINES[config["engine"]]
    extra = {"logits_all": True} if config["engine"] == "llamacpp" else {}
    engine = kind(Path(config["model"]), config["threads"], len(ids) + 8, **extra)
    _say(engine.name, f"perplexity on {len(ids)} tokens")
    return {"perplexity": engine.perplexity(ids), "tokens": len(ids)}


def export(argv: list[str]) -> dict[str, Any]:
    from edgellm.cli.main import main

    rc = main(["export", *argv])
    return {"rc": rc, "torch_imported": "torch" in sys.modules}


def main() -> int:
    mode = sys.argv[1]
    if mode == "export":
        out, argv = Path(sys.argv[2]), sys.argv[4:]
        result = export(argv)
    else:
        config = json.loads(Path(sys.argv[2]).read_text())
        out = Path(sys.argv[3])
        result = speed(config) if mode == "speed" else quality(config)
    result["peak_rss_mb"] = peak_rss_mb()
    out.write_text(json.dumps(result, indent=1))
    return int(result.get("rc", 0))


if __name__ == "__main__":
    sys.exit(main())

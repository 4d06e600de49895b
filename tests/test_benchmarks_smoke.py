"""benchmarks/bench.py on a tiny model, edgellm only: it runs, and its JSON has the right fields.

No timing is asserted (numbers belong to the benchmark, not to tests); what is
checked is that each measurement is there, is plausible, and means what it says.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
from engines import _timed, perplexity  # noqa: E402
from prompts import PromptSet  # noqa: E402

TOKENS = 4


@pytest.fixture(scope="module")
def bench_run(tiny_hf, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    work = tmp_path_factory.mktemp("bench")
    out = work / "results.json"
    cmd = [sys.executable, str(BENCH / "bench.py"), "--source", str(tiny_hf("llama")), "--work", str(work),
           "--engines", "edgellm", "--tokens", str(TOKENS), "--runs", "1", "--short", "16", "--long", "48",
           "--system", "16", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout, work


def test_json_has_machine_settings_and_export(bench_run):
    results, _, _ = bench_run
    machine = results["machine"]
    assert machine["cpu"] and machine["logical_cores"] >= 1 and machine["date"]
    assert machine["versions"]["onnxruntime"] and machine["versions"]["edgellm"]
    assert set(results["settings"]["prompt_tokens"]) == {"short", "long", "prefix", "system"}
    for name in ("default", "--no-eval"):
        export = results["export"][name]
        assert export["rc"] == 0 and export["wall_s"] > 0 and export["peak_rss_mb"] > 0
        assert isinstance(export["torch_imported"], bool)


def test_edgellm_measurements(bench_run):
    results, _, _ = bench_run
    e = results["engines"]["edgellm"]
    sizes = results["settings"]["prompt_tokens"]
    assert e["peak_rss_mb"] > 0 and e["load_s"] > 0
    for label in ("short", "long"):
        run = e[label]
        # edgellm tokenized the text itself: it must see exactly the ids the peers are given.
        assert run["prompt_tokens"] == sizes[label]
        assert run["completion_tokens"] == TOKENS
        assert run["decode_tokens_per_s"] > 0 and run["ttft_s"] > 0
    assert sizes["short"] < sizes["long"]
    cold, cached = e["prefix"]["cold"], e["prefix"]["cached"]
    assert cold["prompt_tokens"] == sizes["prefix"]
    # The second request reuses at least the system prompt; the first starts from nothing.
    assert cold["cached_prompt_tokens"] == 0
    assert cached["cached_prompt_tokens"] >= sizes["system"]
    assert results["quality"]["edgellm"]["perplexity"] > 1


def test_bars_and_table(bench_run):
    results, stdout, _ = bench_run
    status = {b["name"]: b["status"] for b in results["bars"]}
    assert status["edgellm decode (short prompt) >= 1.0x onnxruntime-genai"] == "SKIP"  # no peer ran
    assert status["edgellm peak RSS <= 300 MB"] in ("PASS", "FAIL")
    assert status["export default imports no torch"] in ("PASS", "FAIL")
    assert "tok/s short" in stdout and "\nedgellm " in stdout
    assert results["ratios"] == {}


def test_prompt_set_shares_exactly_the_system_prompt(bench_run):
    _, _, work = bench_run
    prompts = PromptSet(next(work.glob("edgellm-*-int4")))
    a, b = prompts.shared_prefix(40, run=1)
    common = next(i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y)
    assert common >= 40 and a.ids != b.ids
    other, _ = prompts.shared_prefix(40, run=2)
    assert other.ids[:common] != a.ids[:common]  # each run's pair starts cold
    assert abs(len(prompts.plain(60).ids) - 60) <= 12


def test_perplexity_of_uniform_and_certain_logits():
    ids = [3, 1, 2, 0]
    assert perplexity(np.zeros((4, 5)), ids) == pytest.approx(5.0)
    sure = np.full((4, 5), -1e4)
    sure[np.arange(3), ids[1:]] = 0.0
    assert perplexity(sure, ids) == pytest.approx(1.0)


def test_timed_stops_at_the_limit():
    run = _timed(iter([7, 8, 9, 10]), started=0.0, limit=3, prompt_tokens=5, cached=2)
    assert run.token_ids == [7, 8, 9] and run.prompt_tokens == 5 and run.cached_prompt_tokens == 2
    assert run.decode_tokens_per_s > 0


def _engine(decode: float, long: float, cold: float, cached: float, rss: float, ids: tuple[int, ...] = ()) -> dict:
    return {
        "short": {"decode_tokens_per_s": decode, "first_ids": list(ids),
                  "runs": [{"decode_tokens_per_s": decode}, {"decode_tokens_per_s": 2 * decode}]},
        "long": {"decode_tokens_per_s": long, "runs": [{"decode_tokens_per_s": long}]},
        "prefix": {"cold": {"ttft_s": cold}, "cached": {"ttft_s": cached, "cached_prompt_tokens": 200}},
        "peak_rss_mb": rss,
    }


def test_bars_compare_in_the_right_direction():
    engines = {"edgellm": _engine(30, 20, 1.0, 0.5, 250, (1, 2, 3)), "genai": _engine(25, 24, 0.5, 0.5, 400, (1, 2, 4))}
    results = {"engines": engines, "ratios": report.ratios(engines), "export": {}}
    status = {b["name"]: b["status"] for b in report.bars(results)}
    assert status["edgellm decode (short prompt) >= 1.0x onnxruntime-genai"] == "PASS"
    assert status["edgellm decode (long prompt) >= 1.0x onnxruntime-genai"] == "FAIL"
    assert status["edgellm long-context decode >= 0.8x short"] == "FAIL"  # 20/30
    assert status["edgellm cached TTFT <= 0.3x cold"] == "FAIL"  # 0.5/1.0
    assert status["edgellm peak RSS <= 300 MB"] == "PASS"
    assert results["ratios"]["edgellm_vs_genai"]["peak_rss_mb"] == pytest.approx(250 / 400)
    assert report.agreement(engines) == {"genai": 2}
    assert report.unstable(engines) == ["edgellm short decode 2.0x apart", "onnxruntime-genai short decode 2.0x apart"]


def test_same_weights_and_exact_import_bars():
    engines = {"edgellm": _engine(27, 20, 1.0, 0.1, 250), "edgellm-requant": _engine(30, 20, 1.0, 0.1, 250),
               "genai": _engine(31, 24, 0.5, 0.5, 400)}
    quality = {"edgellm": {"perplexity": 31.0, "source_perplexity": 30.0}}
    results = {"engines": engines, "ratios": report.ratios(engines), "export": {}, "quality": quality}
    status = {b["name"]: b["status"] for b in report.bars(results)}
    assert status["edgellm --requantize decode (short prompt) >= 1.0x onnxruntime-genai"] == "FAIL"  # 30/31
    assert status["edgellm exact import decode (short prompt) >= 0.9x --requantize"] == "PASS"  # 27/30
    assert status["edgellm perplexity <= 1.05x its source"] == "PASS"  # 31/30
    quality["edgellm"]["perplexity"] = 32.0
    engines["edgellm"] = _engine(26, 20, 1.0, 0.1, 250)
    status = {b["name"]: b["status"] for b in report.bars(results)}
    assert status["edgellm exact import decode (short prompt) >= 0.9x --requantize"] == "FAIL"  # 26/30
    assert status["edgellm perplexity <= 1.05x its source"] == "FAIL"  # 32/30


def test_worker_peak_rss_is_its_own_not_its_parents():
    """wait4's ru_maxrss keeps the parent's size at the fork: a worker started by a process that
    built a big model read as big as its parent. The worker reports its own peak instead."""
    from bench import run_measured

    ballast = np.ones(400_000_000 // 8)  # 400 MB resident in this (the parent) process
    probe = f"import sys; sys.path.insert(0, {str(BENCH)!r}); from worker import peak_rss_mb; print(peak_rss_mb())"
    own = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert 5 < own < 200
    assert run_measured([sys.executable, "-c", probe])["peak_rss_mb"] > 400  # what wait4 says of the same child
    del ballast

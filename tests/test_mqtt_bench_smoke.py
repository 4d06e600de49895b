"""benchmarks/mqtt_bench.py on the tiny bundle with small counts: it runs end to end and its JSON says what it means.

No timing is asserted: the latency bar belongs to the benchmark, not to tests.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.service.broker import find_mosquitto

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import mqtt_bench  # noqa: E402

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (apt-get install mosquitto)"),
    pytest.mark.timeout(120),
]
REQUESTS, MALFORMED, WARMUP = 24, 0.25, 8


@pytest.fixture(scope="module")
def bench_run(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("mqtt-bench") / "results.json"
    cmd = [sys.executable, str(BENCH / "mqtt_bench.py"), str(tiny_bundle), "--requests", str(REQUESTS),
           "--malformed", str(MALFORMED), "--max-tokens", "4", "--warmup", str(WARMUP), "--timeout", "30",
           "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_every_request_is_answered_once_with_the_right_kind(bench_run):
    results, _ = bench_run
    assert results["verdicts"] == {"ok": REQUESTS, "lost": 0, "duplicate": 0, "wrong": 0}, results["failures"]
    assert results["unmatched_replies"] == 0
    kinds = results["by_kind"]
    assert sum(k["sent"] for k in kinds.values()) == REQUESTS
    assert REQUESTS - kinds["valid"]["sent"] == round(REQUESTS * MALFORMED)
    assert set(kinds) == {"valid", *mqtt_bench.FAMILIES}  # 6 malformed: every family shows up


def test_latency_and_memory_are_measured(bench_run):
    results, _ = bench_run
    lat = results["latency_ms"]
    assert lat["round_trip"]["n"] == lat["model_ttft"]["n"] == lat["overhead"]["n"] > 0
    assert lat["request_total"]["n"] == results["by_kind"]["valid"]["sent"]
    # The first chunk can only arrive after the model produced its first token.
    assert lat["round_trip"]["median"] > lat["model_ttft"]["median"] > 0
    service = results["service"]
    assert service["alive_at_end"] is True and service["exit_code"] == 0  # SIGTERM is a clean stop
    assert set(service["rss_mb"]) == {str(WARMUP), str(REQUESTS)}
    assert service["rss_growth_mb"] == pytest.approx(service["rss_mb"][str(REQUESTS)] - service["rss_mb"][str(WARMUP)])
    assert results["machine"]["cpu"] and results["settings"]["mqtt_version"] == "5"


def test_bars_and_table_are_printed(bench_run):
    results, stdout = bench_run
    names = [b["name"] for b in results["bars"]]
    assert len(names) == 4 and all(b["status"] in ("PASS", "FAIL") for b in results["bars"])
    assert results["bars"][1]["status"] == "PASS" and results["bars"][2]["status"] == "PASS"
    for name in names:
        assert name in stdout
    assert "publish -> first chunk" in stdout and "broker overhead" in stdout


def test_verdict_catches_a_wrong_code_a_duplicate_and_a_broken_stream():
    valid = mqtt_bench.Planned(b"{}", "valid")
    bad = mqtt_bench.Planned(b"x", "bad_json", "bad_request", None)
    final = {"id": "r1", "done": True, "text": "ab", "finish_reason": "length", "usage": {}}
    chunks = [(0.1, {"id": "r1", "seq": 0, "delta": "a"}), (0.2, {"id": "r1", "seq": 1, "delta": "b"})]
    assert mqtt_bench.verdict(valid, mqtt_bench.Outcome(0.0, [*chunks, (0.3, final)])) == "ok"
    assert mqtt_bench.verdict(valid, mqtt_bench.Outcome(0.0, chunks[1:] + [(0.3, final)])) == "wrong"
    assert mqtt_bench.verdict(valid, mqtt_bench.Outcome(0.0, [*chunks, (0.3, final), (0.4, final)])) == "duplicate"
    assert mqtt_bench.verdict(valid, mqtt_bench.Outcome(0.0, chunks)) == "lost"
    error = {"id": None, "status": "error", "error": {"code": "bad_request", "message": "x"}}
    assert mqtt_bench.verdict(bad, mqtt_bench.Outcome(0.0, [(0.1, error)])) == "ok"
    internal = {**error, "error": {"code": "internal", "message": "x"}}
    assert mqtt_bench.verdict(bad, mqtt_bench.Outcome(0.0, [(0.1, internal)])) == "wrong"
    assert mqtt_bench.verdict(bad, mqtt_bench.Outcome(0.0, [(0.1, final)])) == "wrong"

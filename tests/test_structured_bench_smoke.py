"""benchmarks/structured.py and validate_structured.py on the tiny bundle: they run, and their JSON means what it says.

No timing is asserted (the 0.95x bar belongs to the benchmark). The validation script's
judge is checked too: it must call a broken output a failure, or its PASS means nothing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

pytest.importorskip("llguidance", reason="constrained decoding needs the grammar extra")

import structured  # noqa: E402
import validate_structured as vs  # noqa: E402

pytestmark = pytest.mark.timeout(300)
TOKENS, RUNS = 12, 2


@pytest.fixture(scope="module")
def bundle(tiny_bundle_factory) -> Path:
    """Room for the tool sets' prompts: the tiny byte-level vocabulary spells them in ~1,000 tokens."""
    return tiny_bundle_factory("llama", max_position_embeddings=2048)


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=280)


@pytest.fixture(scope="module")
def speed_run(bundle, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("structured") / "results.json"
    done = _run("structured.py", "--bundle", str(bundle), "--tokens", str(TOKENS), "--runs", str(RUNS),
                "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


@pytest.fixture(scope="module")
def validation_run(bundle, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, int]:
    out = tmp_path_factory.mktemp("validate") / "results.json"
    done = _run("validate_structured.py", "--bundle", str(bundle), "--seeds", "1", "--max-tokens", "160",
                "--json", str(out))
    assert done.returncode in (0, 1), done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout, done.returncode


def test_every_mode_runs_the_same_budget_interleaved(speed_run):
    results, _ = speed_run
    assert set(results["runs"]) == set(structured.MODES)
    for mode, runs in results["runs"].items():
        assert len(runs) == RUNS
        for run in runs:
            assert 1 < run["completion_tokens"] <= TOKENS and run["decode_tokens_per_s"] > 0
            assert len(run["step_ms"]) < run["completion_tokens"] and all(t > 0 for t in run["step_ms"])
            assert run["prompt_tokens"] == results["settings"]["prompt_tokens"]  # one prompt for all modes
            # Only a run the budget cut short can be incomplete, and only under a constraint.
            assert not run["incomplete"] or (mode != "plain" and run["finish_reason"] == "length"), run
            assert run["valid"] is (None if run["incomplete"] else True), run
    assert all(r["completion_tokens"] == TOKENS for r in results["runs"]["plain"])  # EOS ignored


def test_profile_splits_a_step_and_only_constrained_modes_pay_for_a_mask(speed_run):
    results, stdout = speed_run
    prof = results["profile"]["modes"]
    assert prof["plain"]["mask"] == prof["plain"]["advance"] == 0
    assert prof["plain"]["estimated_ratio"] == 1.0
    for mode in ("json_object", "json_schema", "regex"):
        assert prof[mode]["mask"] > 0 and prof[mode]["advance"] > 0
        assert prof[mode]["overhead"] > prof[mode]["mask"]
    for p in prof.values():
        assert p["overhead"] == pytest.approx(sum(p[k] for k in structured.PARTS) - p["forward"])
    assert results["profile"]["forward_q1_ms"] > 0
    assert "median ms per step" in stdout and results["settings"]["profile_runs"] == 3


def test_speed_bars_are_ratios_against_plain(speed_run):
    results, stdout = speed_run
    modes = results["modes"]
    bars = {b["name"]: b for b in results["bars"]}
    assert len(bars) == 3
    bar = bars["decode under json_schema >= 0.95x plain decode, same run"]
    assert bar["value"] == pytest.approx(modes["json_schema"]["decode_tokens_per_s"]
                                         / modes["plain"]["decode_tokens_per_s"])
    assert bar["status"] == ("PASS" if bar["value"] >= 0.95 else "FAIL")
    assert bar["name"] in stdout and results["machine"]["cpu"]


def test_structured_checker_refuses_what_breaks_the_constraint():
    assert structured.valid("regex", "00:00 fan 1 ok 1.0\n" * 6)
    assert not structured.valid("regex", "00:00 fan 1 ok 1.0\n" * 5)  # {6,10} lines
    assert not structured.valid("json_object", "[1]") and not structured.valid("json_object", "{")
    assert not structured.valid("json_schema", '{"line": "3", "status": "on", "readings": [], "actions": []}')


def test_validation_counts_add_up_and_nothing_complete_fails(validation_run):
    results, stdout, rc = validation_run
    assert set(results["schemas"]) == set(vs.SCHEMAS)
    assert not results.get("tools_skipped"), results.get("tools_skipped")
    assert len(results["tools"]) == 3 * len(vs.TOOL_SETS)
    for name, t in {**results["schemas"], **results["tools"]}.items():
        assert t["runs"] == 1 == t["valid"] + t["incomplete"] + t["no_call"] + t["FAILED"], name
        for o in t["outcomes"]:
            if o["verdict"] == "incomplete":
                assert o["finish_reason"] == "length", (name, o)
    # A tiny random model's output holds to a grammar by the mask alone: nothing complete may fail.
    assert [b["status"] for b in results["bars"]] == ["PASS", "PASS"], stdout
    assert all(b["complete"] >= 3 for b in results["bars"])  # the judge had something to judge
    assert rc == 0 and "heating_schedule" in stdout and "thermostat (required)" in stdout


def test_schema_judge_checks_formats_patterns_and_anyof():
    schema = vs.SCHEMAS["door_event"][1]
    good = {"device": {"id": "3f2c9a1e-7b4d-4e8a-9c1f-2d6b8e0a5f71", "kind": "door"}, "event": "opened",
            "occupants": None}
    assert vs.errors(schema, json.dumps(good)) is None
    assert "uuid" in vs.errors(schema, json.dumps({**good, "device": {"id": "nope", "kind": "door"}}))
    assert vs.errors(schema, '{"device": ').startswith("not JSON")
    assert "does not match" in vs.errors(vs.SCHEMAS["quality_check"][1], '{"batch": "X1", "samples_nm": [1, 2], '
                                                                   '"verdict": "pass"}')
    triage = vs.SCHEMAS["alarm_triage"][1]
    assert vs.errors(triage, '{"alarm_id": 1, "decision": {"action": "escalate", "level": 3}}') is None
    assert vs.errors(triage, '{"alarm_id": 1, "decision": {"action": "escalate", "level": 9}}') is not None


def test_tool_call_judge():
    tools = vs.TOOL_SETS["thermostat"][1]

    def result(calls: list, finish: str = "tool_calls", incomplete: bool = False) -> SimpleNamespace:
        return SimpleNamespace(tool_calls=calls, finish_reason=finish, incomplete=incomplete)

    def call(name: str, args: str) -> dict:
        return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}

    ok = call("set_temperature", '{"room": "kitchen", "celsius": 21}')
    assert vs._call_verdict(result([ok]), tools, None, True) == ("valid", None)
    assert vs._call_verdict(result([ok]), tools, "get_temperature", True)[0] == "FAILED"
    too_hot = call("set_temperature", '{"room": "kitchen", "celsius": 40}')
    assert vs._call_verdict(result([too_hot]), tools, None, True)[0] == "FAILED"
    assert vs._call_verdict(result([ok], finish="stop"), tools, None, True)[0] == "FAILED"
    assert vs._call_verdict(result([], finish="stop"), tools, None, True)[0] == "FAILED"
    assert vs._call_verdict(result([], finish="stop"), tools, None, False) == ("no_call", None)
    assert vs._call_verdict(result([], "length", True), tools, None, True) == ("incomplete", None)

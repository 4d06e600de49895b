"""Every constrained output validates: real model, schemas and tool sets no test uses, temperature 1.0, several seeds.

    python benchmarks/validate_structured.py [--bundle DIR] [--seeds 5] [--max-tokens 320] [--json out.json]

Issue 10's second bar. Each schema below (nested objects, enums, bounded arrays, number
ranges, string patterns and formats, optional keys, anyOf) gets a realistic factory or
smart-home prompt and is generated once per seed; each tool set is offered with
tool_choice "required", a named function and "auto". The judge is jsonschema, formats
included, not the runtime: a complete output that does not parse and validate is a
FAILURE; one the runtime marks `incomplete` (the token budget ran out first) is counted
apart and must not pass as complete. Exits 1 when anything failed. Progress goes to
stderr; the counts per schema and tool set, and the PASS/FAIL line, to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from structured import add_model_args, aligned, ensure_bundle, load  # noqa: E402

ROOMS = ["kitchen", "living_room", "bedroom", "bathroom", "garage"]
HHMM = "^([01][0-9]|2[0-3]):[0-5][0-9]$"
SYSTEM = "You are the assistant of an edge gateway. Answer with the JSON requested and nothing else."

# name -> (user prompt, schema). None of these appear in tests/.
SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "heating_schedule": (
        "The bedroom is cold at 6 am on weekdays and too warm at night. Propose a heating schedule.",
        {"type": "object", "properties": {
            "room": {"enum": ROOMS},
            "setpoints": {"type": "array", "minItems": 2, "maxItems": 4, "items": {
                "type": "object", "properties": {"at": {"type": "string", "pattern": HHMM},
                                                 "celsius": {"type": "number", "minimum": 12, "maximum": 26}},
                "required": ["at", "celsius"], "additionalProperties": False}},
            "eco": {"type": "boolean"}},
         "required": ["room", "setpoints"], "additionalProperties": False}),
    "work_order": (
        "Filling machine FM-204 at the Lyon site leaks at the valve seal. Open a maintenance work order "
        "with the spare parts needed.",
        {"type": "object", "properties": {
            "work_order": {"type": "string", "pattern": "^WO-[0-9]{5}$"},
            "asset": {"type": "object", "properties": {
                "site": {"enum": ["lyon", "porto", "gdansk"]},
                "tag": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                "required": ["site", "tag"], "additionalProperties": False},
            "priority": {"type": "integer", "minimum": 1, "maximum": 5},
            "parts": {"type": "array", "maxItems": 3, "items": {
                "type": "object", "properties": {"part_no": {"type": "string", "maxLength": 12},
                                                 "qty": {"type": "integer", "minimum": 1, "maximum": 20}},
                "required": ["part_no", "qty"], "additionalProperties": False}},
            "due": {"type": "string", "format": "date"}},
         "required": ["work_order", "asset", "priority", "parts"], "additionalProperties": False}),
    "sensor_batch": (
        "Gateway gw-barn-2 collected these readings: 21.5 C, 64 % humidity, 820 ppm CO2, 1012 hPa. "
        "Its battery is at 37 %. Report the batch.",
        {"type": "object", "properties": {
            "gateway": {"type": "string", "maxLength": 20},
            "battery_pct": {"type": "integer", "minimum": 0, "maximum": 100},
            "readings": {"type": "array", "minItems": 3, "maxItems": 6, "items": {
                "type": "object", "properties": {
                    "kind": {"enum": ["temperature", "humidity", "co2", "pressure"]},
                    "value": {"type": "number", "minimum": -40, "maximum": 5000},
                    "ok": {"type": "boolean"}},
                "required": ["kind", "value", "ok"], "additionalProperties": False}}},
         "required": ["gateway", "battery_pct", "readings"], "additionalProperties": False}),
    "alarm_triage": (
        "Alarm 4471: the cold room door has been open for 14 minutes and the temperature rose to 9 C. "
        "Decide what to do.",
        {"type": "object", "properties": {
            "alarm_id": {"type": "integer", "minimum": 1},
            "decision": {"anyOf": [
                {"type": "object", "properties": {"action": {"const": "dispatch"},
                                                  "technician": {"type": "string", "maxLength": 30},
                                                  "eta_minutes": {"type": "integer", "minimum": 5, "maximum": 240}},
                 "required": ["action", "technician", "eta_minutes"], "additionalProperties": False},
                {"type": "object", "properties": {"action": {"const": "acknowledge"},
                                                  "note": {"type": "string", "maxLength": 80}},
                 "required": ["action", "note"], "additionalProperties": False},
                {"type": "object", "properties": {"action": {"const": "escalate"},
                                                  "level": {"type": "integer", "minimum": 2, "maximum": 3}},
                 "required": ["action", "level"], "additionalProperties": False}]}},
         "required": ["alarm_id", "decision"], "additionalProperties": False}),
    "light_scene": (
        "Movie night: dim the living room, turn off the kitchen, a warm orange light in the bedroom.",
        {"type": "object", "properties": {
            "scene": {"type": "string", "minLength": 3, "maxLength": 24},
            "lights": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
                "type": "object", "properties": {
                    "room": {"enum": ROOMS}, "on": {"type": "boolean"},
                    "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                    "color": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
                "required": ["room", "on"], "additionalProperties": False}},
            "transition_s": {"type": "number", "minimum": 0, "maximum": 10}},
         "required": ["scene", "lights"], "additionalProperties": False}),
    "energy_report": (
        "Last week the house drew 41.2 kWh from the grid and the panels made 63.8 kWh; the battery ends at "
        "80 % charge. Summarise the week.",
        {"type": "object", "properties": {
            "period": {"type": "object", "properties": {"start": {"type": "string", "format": "date"},
                                                        "end": {"type": "string", "format": "date"}},
                       "required": ["start", "end"], "additionalProperties": False},
            "meters": {"type": "object", "properties": {
                "grid_kwh": {"type": "number", "minimum": 0},
                "solar_kwh": {"type": "number", "minimum": 0},
                "battery": {"type": "object", "properties": {
                    "charge_pct": {"type": "integer", "minimum": 0, "maximum": 100},
                    "health": {"enum": ["good", "fair", "replace"]}},
                    "required": ["charge_pct", "health"], "additionalProperties": False}},
                "required": ["grid_kwh", "solar_kwh", "battery"], "additionalProperties": False},
            "peak_hour": {"type": "integer", "minimum": 0, "maximum": 23},
            "notes": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 60}}},
         "required": ["period", "meters", "peak_hour"], "additionalProperties": False}),
    "quality_check": (
        "Batch B240117 of bottle caps: torque samples were 2.1, 2.4 and 1.7 Nm, the limit is 1.8 Nm. "
        "Record the inspection.",
        {"type": "object", "properties": {
            "batch": {"type": "string", "pattern": "^B[0-9]{6}$"},
            "samples_nm": {"type": "array", "minItems": 2, "maxItems": 4,
                           "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 10}},
            "verdict": {"enum": ["pass", "fail", "retest"]},
            "inspector": {"type": "string", "format": "email"}},
         "required": ["batch", "samples_nm", "verdict"], "additionalProperties": False}),
    "door_event": (
        "The garage door sensor 3f2c9a1e-7b4d-4e8a-9c1f-2d6b8e0a5f71 reports the door opened at night "
        "while nobody was home. Log the event.",
        {"type": "object", "properties": {
            "device": {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"},
                                                        "kind": {"enum": ["door", "window", "motion"]}},
                       "required": ["id", "kind"], "additionalProperties": False},
            "event": {"enum": ["opened", "closed", "tampered"]},
            "occupants": {"type": ["integer", "null"], "minimum": 0, "maximum": 12},
            "confidence": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
         "required": ["device", "event", "occupants"], "additionalProperties": False}),
}


def _function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


# name -> (user prompt, OpenAI function tools); the named choice forces the first one.
TOOL_SETS: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "thermostat": ("It's freezing in the bedroom, make it 22 degrees.", [
        _function("set_temperature", "Set a room's target temperature.",
                  {"room": {"enum": ROOMS}, "celsius": {"type": "number", "minimum": 10, "maximum": 28},
                   "mode": {"enum": ["heat", "cool", "auto"]}}, ["room", "celsius"]),
        _function("get_temperature", "Read a room's current temperature.", {"room": {"enum": ROOMS}}, ["room"])]),
    "valves": ("Zone B of the irrigation is flooding; shut valve V07 and close the others in that zone.", [
        _function("set_valve", "Open a valve to a position.",
                  {"valve": {"type": "string", "pattern": "^V[0-9]{2}$"},
                   "position_pct": {"type": "integer", "minimum": 0, "maximum": 100}}, ["valve", "position_pct"]),
        _function("close_zone", "Close every valve of a zone.", {"zone": {"enum": ["A", "B", "C"]}}, ["zone"])]),
    "tickets": ("Packaging line 2's label printer jams every hour since the night shift. Open a ticket.", [
        _function("create_ticket", "Open a maintenance ticket.",
                  {"title": {"type": "string", "minLength": 5, "maxLength": 80},
                   "priority": {"enum": ["low", "normal", "high", "urgent"]},
                   "asset": {"type": "string", "maxLength": 40},
                   "labels": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 20}}},
                  ["title", "priority", "asset"])]),
    "light_scenes": ("Set the lights for dinner: kitchen bright, living room at 30 percent.", [
        _function("set_light", "Switch or dim one room's light.",
                  {"room": {"enum": ROOMS}, "on": {"type": "boolean"},
                   "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                   "color": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}, ["room", "on"]),
        _function("activate_scene", "Recall a stored scene.", {"scene": {"enum": ["dinner", "movie", "night", "away"]}},
                  ["scene"])]),
}


def errors(schema: dict[str, Any], text: str) -> str | None:
    """Why `text` is not a JSON document valid under `schema` (formats checked too); None when it is."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON: {e}"
    cls = jsonschema.validators.validator_for(schema)
    found = next(iter(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(value)), None)
    return None if found is None else f"{'/'.join(map(str, found.absolute_path)) or '(root)'}: {found.message}"


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def _tally(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"runs": len(outcomes), **{k: sum(o["verdict"] == k for o in outcomes)
                                      for k in ("valid", "incomplete", "no_call", "FAILED")},
            "tokens": sorted(o["tokens"] for o in outcomes), "outcomes": outcomes}


def check_schemas(model: Any, seeds: int, max_tokens: int) -> dict[str, Any]:
    out = {}
    for name, (prompt, schema) in SCHEMAS.items():
        report.stage(f"schema {name}: {seeds} seeds")
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        outcomes = []
        for seed in range(seeds):
            r = model.generate(_messages(prompt), response_format=fmt, temperature=1.0, seed=seed,
                               max_new_tokens=max_tokens)
            why = errors(schema, r.text)
            verdict = "incomplete" if r.incomplete else "valid" if why is None else "FAILED"
            outcomes.append({"seed": seed, "verdict": verdict, "finish_reason": r.finish_reason,
                             "tokens": r.usage.completion_tokens, "error": why, "text": r.text})
        out[name] = _tally(outcomes)
    return out


def tools_supported(model: Any) -> str | None:
    """None when `model.generate` takes `tools`; else why the tool section is skipped."""
    from edgellm.errors import GenerationError

    prompt, tools = TOOL_SETS["thermostat"]
    try:
        model.generate(_messages(prompt), tools=tools, tool_choice="required", max_new_tokens=1)
    except (GenerationError, TypeError) as e:
        if "tools" in str(e):
            return f"this edgellm does not take tools yet ({e})"
        raise
    return None


def _call_verdict(r: Any, tools: list[dict[str, Any]], named: str | None, forced: bool) -> tuple[str, str | None]:
    """(verdict, why) of one tool-call result: each call an offered (or the named) function
    whose arguments validate against that function's parameters."""
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    calls = getattr(r, "tool_calls", None) or []
    if r.incomplete:
        return "incomplete", None
    if not calls:
        return ("FAILED", f"no tool call (finish_reason {r.finish_reason!r})") if forced else ("no_call", None)
    if r.finish_reason != "tool_calls":
        return "FAILED", f"{len(calls)} call(s) but finish_reason {r.finish_reason!r}"
    for call in calls:
        fn = call.get("function", {})
        if call.get("type") != "function" or not call.get("id") or fn.get("name") not in params:
            return "FAILED", f"malformed call {call!r}"
        if named and fn["name"] != named:
            return "FAILED", f"called {fn['name']!r}, {named!r} was required"
        if not isinstance(fn.get("arguments"), str):
            return "FAILED", f"{fn['name']}: arguments are not a JSON string: {fn.get('arguments')!r}"
        if why := errors(params[fn["name"]], fn["arguments"]):
            return "FAILED", f"{fn['name']}: {why}"
    return "valid", None


def check_tools(model: Any, seeds: int, max_tokens: int) -> dict[str, Any]:
    out = {}
    for name, (prompt, tools) in TOOL_SETS.items():
        first = tools[0]["function"]["name"]
        choices = {"required": "required", f"named {first}": {"type": "function", "function": {"name": first}},
                   "auto": "auto"}
        for label, choice in choices.items():
            report.stage(f"tools {name}, tool_choice {label}: {seeds} seeds")
            outcomes = []
            for seed in range(seeds):
                r = model.generate(_messages(prompt), tools=tools, tool_choice=choice, temperature=1.0, seed=seed,
                                   max_new_tokens=max_tokens)
                verdict, why = _call_verdict(r, tools, first if label.startswith("named") else None,
                                             forced=label != "auto")
                outcomes.append({"seed": seed, "verdict": verdict, "finish_reason": r.finish_reason,
                                 "tokens": r.usage.completion_tokens, "error": why, "text": r.text,
                                 "tool_calls": getattr(r, "tool_calls", None)})
            out[f"{name} ({label})"] = _tally(outcomes)
    return out


def table(results: dict[str, Any]) -> str:
    head = ("schema / tool set", "runs", "valid", "incomplete", "no call", "FAILED", "tokens (min-max)")
    rows = [head]
    for section in ("schemas", "tools"):
        for name, t in results[section].items():
            rows.append((name, str(t["runs"]), str(t["valid"]), str(t["incomplete"]),
                         str(t["no_call"]) if section == "tools" else "—", str(t["FAILED"]),
                         f"{t['tokens'][0]}-{t['tokens'][-1]}"))
    lines = aligned(rows)
    s = results["settings"]
    lines.append(f"(temperature 1.0, seeds 0-{s['seeds'] - 1}, max {s['max_tokens']} new tokens; valid: parses and "
                 "validates under jsonschema, formats included; incomplete: the budget ran out and the result says "
                 "so; no call: tool_choice auto answered in text)")
    if results.get("tools_skipped"):
        lines.append(f"tool calls: skipped: {results['tools_skipped']}")
    for section in ("schemas", "tools"):
        for name, t in results[section].items():
            for o in t["outcomes"]:
                if o["verdict"] == "FAILED":
                    lines.append(f"FAILED {name} seed {o['seed']}: {o['error']}\n    {o['text'][:300]!r}")
    return "\n".join(lines)


def bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for section, what in (("schemas", "JSON schema outputs"), ("tools", "tool-call arguments")):
        tallies = results[section].values()
        complete = sum(t["runs"] - t["incomplete"] - t["no_call"] for t in tallies)
        failed = sum(t["FAILED"] for t in tallies)
        skipped = section == "tools" and results.get("tools_skipped")
        out.append({"name": f"every complete one of the {what} validates", "complete": complete,
                    "valid": complete - failed, "incomplete": sum(t["incomplete"] for t in tallies),
                    "status": "SKIP" if skipped else "PASS" if failed == 0 else "FAIL"})
    return out


def bar_lines(checks: list[dict[str, Any]]) -> str:
    return "\n".join(f"{c['status']:4}  {c['name']}  ({c['valid']} of {c['complete']} valid; "
                     f"{c['incomplete']} incomplete, counted apart)" for c in checks)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--seeds", type=int, default=5, help="generations per schema and tool choice (default 5)")
    p.add_argument("--max-tokens", type=int, default=320, help="max new tokens per generation (default 320)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.max_tokens < 1:
        p.error("--seeds and --max-tokens must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = report.machine_info()
    model = load(ensure_bundle(args.bundle), args.threads)
    results: dict[str, Any] = {"settings": {"seeds": args.seeds, "max_tokens": args.max_tokens},
                               "schemas": check_schemas(model, args.seeds, args.max_tokens), "tools": {}}
    skipped = tools_supported(model)
    if skipped:
        report.stage(f"tool calls: skipped: {skipped}")
        results["tools_skipped"] = skipped
    else:
        results["tools"] = check_tools(model, args.seeds, args.max_tokens)
    results["machine"] = {**machine, "load_average_end": os.getloadavg()[0]}
    results["bars"] = bars(results)
    report.emit(results, table(results), bar_lines(results["bars"]), args.json)
    return 1 if any(b["status"] == "FAIL" for b in results["bars"]) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The anomaly recipe: events validated and coalesced on their own, then end to end on a real
mosquitto, through a real service, with a tiny random model held to the shipped schema.

The tiny model's context is 2048 here: a random model fills every string of the schema to its
maxLength, and the schema's bounds then need about 800-1200 tokens after a ~650-token prompt.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema  # the test extra's: an independent judge of the explanations
import pytest

import edgellm
from edgellm.cli.main import main
from edgellm.errors import RecipeError, RequestError
from edgellm.recipes.anomaly import AnomalyRecipe, explanation, request_body
from edgellm.recipes.config import DEFAULT_BANDS, SCHEMA, AnomalyConfig, load_config
from edgellm.recipes.facts import WORD_MAX, Band, facts, request_schema
from edgellm.recipes.events import MAX_IDS, Coalescer, Group, parse_event
from edgellm.service import protocol as proto
from edgellm.service.broker import find_mosquitto
from mqtt_helpers import Gated, Probe, connection, payload, running_service

ROOT = Path(__file__).resolve().parent.parent
TOPICS = proto.Topics("edgellm", "dev1")
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")


def event(sensor: str = "vibration", value: float = 7.1, **extra: Any) -> dict[str, Any]:
    return {"machine": "press-1", "sensor": sensor, "value": value, "baseline": 2.0, "unit": "mm/s",
            "timestamp": "2025-03-01T10:00:00Z", **extra}


def parsed(data: dict[str, Any] | bytes, max_bytes: int = 4096):
    return parse_event(data if isinstance(data, bytes) else json.dumps(data).encode(), max_bytes)


def write_config(folder: Path, serve: dict[str, Any] | None = None, **anomaly: Any) -> Path:
    """A settings file; JSON's spelling of strings and numbers is TOML's too."""
    lines = ["[serve]", *(f"{k} = {json.dumps(v)}" for k, v in (serve or {}).items()),
             "[anomaly]", *(f"{k} = {json.dumps(v)}" for k, v in anomaly.items())]
    path = folder / "anomaly.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- events and the coalescer, no broker -----------------------------------------------------------

def test_an_event_parses_and_one_without_an_id_gets_a_stable_one():
    full = parsed(event(id="ev-7", context={"shift": "B", "load_pct": 80}, timestamp=1740823200.5))
    assert (full.id, full.machine, full.sensor, full.value, full.timestamp) == ("ev-7", "press-1", "vibration",
                                                                                 7.1, 1740823200.5)
    assert json.loads(full.context) == {"shift": "B", "load_pct": 80}
    first, again, other = parsed(event()), parsed(event()), parsed(event(value=7.2))
    assert first.id.startswith("ev-") and first.id == again.id != other.id


@pytest.mark.parametrize("payload_, code, reason", [
    (b"not json", proto.BAD_REQUEST, "not valid JSON"),
    (b"[1, 2]", proto.BAD_REQUEST, "must be a JSON object"),
    (json.dumps(event(colour="red")).encode(), proto.BAD_REQUEST, "unknown field 'colour'"),
    (json.dumps({k: v for k, v in event().items() if k != "baseline"}).encode(), proto.BAD_REQUEST,
     "field 'baseline' is required"),
    (json.dumps(event(value=True)).encode(), proto.BAD_REQUEST, "field 'value' must be a number"),
    (json.dumps(event(sensor="a/b")).encode(), proto.BAD_REQUEST, "field 'sensor' must be"),
    (json.dumps(event(id="has space")).encode(), proto.BAD_REQUEST, "field 'id' must be"),
    (json.dumps(event(context="x" * 1001)).encode(), proto.BAD_REQUEST, "field 'context' is 1001 characters"),
    (b'{"value": NaN}', proto.BAD_REQUEST, "NaN is not valid JSON"),
    (b"{" + b" " * 5000 + b"}", proto.TOO_LARGE, "payload is 5002 bytes, limit is 4096"),
])
def test_a_malformed_event_is_refused_naming_the_field(payload_, code, reason):
    with pytest.raises(RequestError, match=reason) as info:
        parsed(payload_)
    assert info.value.code == code


def test_coalescer_merges_within_the_window_and_drops_the_oldest_beyond_its_bound():
    q = Coalescer(window=10.0, bound=2)
    q.add(parsed(event(value=5.0, id="a1")), now=0.0)
    q.add(parsed(event(value=9.0, id="a2", timestamp="t2")), now=3.0)  # same sensor, inside the window
    q.add(parsed(event(value=4.0, id="a3", timestamp="t3")), now=9.9)
    assert (len(q), q.coalesced, q.pop_due(9.99)) == (1, 2, None)  # not due before its window closes
    group = q.pop_due(10.0)
    assert group.summary() == {"count": 3, "ids": ["a1", "a2", "a3"], "min": 4.0, "max": 9.0, "baseline": 2.0,
                               "unit": "mm/s", "first_timestamp": "2025-03-01T10:00:00Z", "last_timestamp": "t3"}
    assert group.variables()["deviation_pct"] == pytest.approx(100.0)  # (4 - 2) / 2, of the last reading
    q.add(parsed(event(id="a4")), now=10.5)  # its group left the queue: a new one
    q.add(parsed(event(id="a5")), now=20.5)  # the window of a4's group closed at 20.5
    q.add(parsed(event(sensor="temp", id="t1")), now=21.0)
    assert (len(q), q.dropped, q.coalesced) == (2, 1, 2)  # a4's group, the oldest, went
    assert [q.pop_due(40).first.id, q.pop_due(40).first.id, q.pop_due(40)] == ["a5", "t1", None]


def test_coalescer_without_a_window_keeps_events_apart_and_a_requeued_group_waits_its_turn():
    q = Coalescer(window=0.0, bound=3)
    for i in range(3):
        q.add(parsed(event(id=f"e{i}")), now=1.0)
    assert (len(q), q.coalesced) == (3, 0)
    first = q.pop_due(1.0)
    q.requeue(first, due=5.0)  # the service was busy
    assert q.pop_due(4.0) is None and q.next_due() == 5.0
    q.add(parsed(event(id="e3")), now=4.0)  # one too many: the requeued group is the oldest
    assert q.dropped == 1 and [q.pop_due(9).first.id for _ in range(3)] == ["e1", "e2", "e3"]


def test_a_group_lists_a_bounded_number_of_ids_and_counts_them_all():
    group = Group(parsed(event(id="e0")), opened=0.0, due=0.0)
    for i in range(1, 100):
        group.add(parsed(event(id=f"e{i}")))
    assert group.count == 100 and len(group.summary()["ids"]) == MAX_IDS


def test_explanation_says_when_the_answer_is_incomplete_and_never_passes_off_bad_json():
    group = Group(parsed(event(id="e1")), opened=0.0, due=0.0)
    found = facts(group, DEFAULT_BANDS["vibration"])
    answer = {"summary": "s", "likely_causes": ["c"], "recommended_action": "a", "evidence": ["e"]}
    done = explanation(group, {"id": "r", "done": True, "text": json.dumps(answer), "finish_reason": "stop"}, found)
    assert (done["id"], done["incomplete"], done["explanation"]) == ("e1", False, {**answer, "severity": "high"})
    cut = explanation(group, {"id": "r", "done": True, "text": '{"summ', "finish_reason": "length",
                              "incomplete": True}, found)
    assert (cut["incomplete"], cut["explanation"], cut["partial_text"]) == (True, None, '{"summ')
    assert cut["facts"] == {"severity": "high", "worst": 7.1, "band": [0.0, 4.5], "excess": 1.04}
    assert explanation(group, {"id": "r", "done": True, "text": '{"summ', "finish_reason": "stop"}, found) is None


# -- computed facts and the per-event grammar ----------------------------------------------------------

def group_of(sensor: str, unit: str, baseline: float, *values: float, machine: str = "pump-2") -> Group:
    group = Group(parsed(event(sensor, values[0], unit=unit, baseline=baseline, machine=machine, id="g0")), 0.0, 0.0)
    for i, value in enumerate(values[1:], 1):
        group.add(parsed(event(sensor, value, unit=unit, baseline=baseline, machine=machine, id=f"g{i}",
                               timestamp=f"2025-03-01T10:00:{i:02d}Z")))
    return group


@pytest.mark.parametrize("sensor, unit, baseline, values, severity", [
    ("temperature", "°C", 55.0, (95.0,), "high"),  # the issue's: 'low' from the model
    ("current", "A", 12.0, (30.0,), "critical"),  # the issue's: 'low' from the model
    ("vibration", "mm/s", 2.2, (4.7, 9.2, 5.0), "critical"),  # the worst reading decides, not the last
    ("temperature", "°C", 55.0, (0.0,), "medium"),  # a dropout: below the band
    ("temperature", "°C", 55.0, (76.0,), "low"),  # just over
    ("pressure", "bar", 4.0, (5.0,), "medium"),  # no band: a quarter off the baseline
])
def test_severity_is_computed_from_the_band_and_the_worst_reading(sensor, unit, baseline, values, severity):
    group = group_of(sensor, unit, baseline, *values)
    found = facts(group, DEFAULT_BANDS.get(sensor))
    answer = {"summary": "s", "likely_causes": ["c"], "severity": "low", "recommended_action": "a", "evidence": ["e"]}
    out = explanation(group, {"text": json.dumps(answer), "finish_reason": "stop"}, found)
    assert out["explanation"]["severity"] == out["facts"]["severity"] == severity  # the model's 'low' is not kept


def test_the_per_event_grammar_holds_the_answer_to_the_events_facts_and_the_bands_causes():
    """jsonschema judges what the grammar (llguidance, checked at load) is given: evidence only
    the computed facts, causes only the configured ones, sentences ending in a full stop without digits."""
    group = group_of("temperature", "°C", 55.0, 82.5, 95.1)
    found = facts(group, DEFAULT_BANDS["temperature"])
    schema = request_schema(SCHEMA, found, ["M4"])
    assert "severity" not in schema["properties"] and "severity" not in schema["required"]
    assert found.evidence[:2] == ("pump-2 temperature reached 95.1 °C", "normal band 10 to 75 °C")
    good = {"summary": "The pump-2 temperature is far above its normal band, so the pump is overheating.",
            "likely_causes": ["cooling fan failure"], "recommended_action": "Check the cooling fan first.",
            "evidence": ["M4", found.evidence[0]]}
    jsonschema.validate(good, schema)
    jsonschema.validate({**good, "summary": "The pump-2 temperature reached 95.1 °C, over its 75 °C limit."}, schema)
    for bad in ({"likely_causes": ["A", "B", "C"]}, {"summary": "The pump-2 temperature reached 96 °C today."},
               {"summary": "The pump-7 temperature is far above its normal band."}, {"evidence": ["./A"]}, {"evidence": ["pump-2 reached 99 °C"]},
                {"summary": "The pump is overheating and the temperature sensor reads a value that is far above the "
                            "normal band of the machine while the fan may have failed and the filter may be blocked "
                            "and the coolant may be low and the"},
                {"summary": "The pump reached ninety five degrees at 10:00."}, {"summary": "Hot."},
                {"summary": "A sensor on a factory machine left its normal band."}):  # not about pump-2's temperature
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**good, **bad}, schema)
    load_config(None)  # compiles each default band's grammar with llguidance


def test_the_sentences_come_after_the_causes_and_cannot_run_on_to_the_length_limit():
    """Issue 23's cut summary: a worn bearing's vibration, retold with the manual's bands until the
    grammar forced the full stop at the 200th character, mid-word. Now the model writes the causes
    and the evidence first, the summary opens as the prompt's example sentence of the group's facts
    does (one the grammar accepts), and a sentence is at most three clauses of words of at most
    WORD_MAX letters."""
    config = load_config(None)
    group = group_of("vibration", "mm/s", 2.2, *[6.48] * 9, 8.62)
    found = facts(group, config.bands["vibration"])
    body = request_body(config, group, found)
    schema = body["response_format"]["json_schema"]["schema"]
    assert list(schema["properties"]) == ["likely_causes", "evidence", "summary", "recommended_action"]
    example = "The pump-2 vibration reached 8.62 mm/s, above its normal band."
    assert f'like "{example}"' in body["messages"][-1]["content"]
    good = {"likely_causes": ["bearing wear"], "evidence": [found.evidence[0]], "summary": example,
            "recommended_action": "Stop the pump-2, check the bearing housing, and grease the bearing."}
    jsonschema.validate(good, schema)
    issue = ("A vibration sensor on a manufacturing machine can cause a band of 10 times between 2.2 and 4.5 mm/s, "
             "which is a high reading, and is a possible cause of bearing wear, shaft misalignment, and rotor-im.")
    for bad in (issue, f"The bearing is {'x' * (WORD_MAX + 1)}."):
        for key in ("summary", "recommended_action"):
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate({**good, key: bad}, schema)
    out = explanation(group, {"text": json.dumps(good), "finish_reason": "stop"}, found)
    assert list(out["explanation"]) == ["summary", "likely_causes", "recommended_action", "evidence", "severity"]


def test_names_as_long_as_an_event_allows_leave_the_summary_a_grammar_llguidance_takes(model):
    """A 64-character machine and sensor, the longest an event may name: "The <machine> <sensor>"
    would take 133 of the summary's 200 characters, a pattern llguidance cannot prove fits, so
    the summary does not have to open with them there, and the request is generated, not refused."""
    config = load_config(None)
    group = group_of("s" * 64, "°C", 55.0, 99.5, machine="m" * 64)
    body = request_body(config, group, facts(group, None))
    result = model.generate(body["messages"], max_new_tokens=4, response_format=body["response_format"])
    assert result.usage.completion_tokens == 4


def test_the_prompt_carries_the_band_limits_the_severity_and_the_facts():
    config = load_config(None)
    group = group_of("temperature", "°C", 55.0, 82.5, 95.1)
    body = request_body(config, group, facts(group, config.bands["temperature"]), [("manual#4", "Fan replacement")])
    prompt = body["messages"][-1]["content"]
    for text in ("normal band 10.0 to 75.0 °C", "Severity: high", "worst reading 95.1 °C", "cooling fan failure",
                 "[manual#4] Fan replacement"):
        assert text in prompt, prompt
    assert body["response_format"]["json_schema"]["schema"]["properties"]["evidence"]["prefixItems"] == \
        [{"enum": ["manual#4"]}]


def test_bands_and_causes_load_from_the_settings_file_and_a_bad_one_is_refused(tmp_path):
    path = tmp_path / "anomaly.toml"
    path.write_text('[anomaly.bands.pressure]\nlow = 2\nhigh = 6\ncauses = ["clogged strainer", "worn pump seal"]\n')
    config = load_config(path)
    assert config.bands["pressure"] == Band(2.0, 6.0, ("clogged strainer", "worn pump seal"))
    assert config.bands["vibration"] == DEFAULT_BANDS["vibration"]  # the defaults stay for the other sensors
    path.write_text("[anomaly.bands.pressure]\nlow = 6\nhigh = 2\n")
    with pytest.raises(RecipeError, match=r"anomaly\.bands\.pressure: low and high must be numbers with low < high"):
        load_config(path)


# -- settings ------------------------------------------------------------------------------------

def test_settings_load_with_relative_prompt_paths_and_defaults(tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "mine.jinja").write_text("{{ machine }} {{ sensor }} {{ value }}{{ unit }}")
    config = load_config(write_config(tmp_path, prompt="prompts/mine.jinja", **{"queue-size": 3, "window": 2}))
    assert (config.prompt, config.queue_size, config.window) == (tmp_path / "prompts" / "mine.jinja", 3, 2.0)
    assert config.template.render(machine="m", sensor="s", value=1, unit="A") == "m s 1A"
    assert config.output_topic("press-1", "temp") == "factory/press-1/temp/explanation"
    assert load_config(None) == AnomalyConfig()  # every default is valid
    assert AnomalyConfig().params()["speculative"] == "prompt_lookup"  # explanations quote their events
    assert load_config(write_config(tmp_path, speculative="off")).params()["speculative"] == "off"


@pytest.mark.parametrize("values, message", [
    ({"windw": 3}, r"unknown key anomaly\.windw"),
    ({"window": "3"}, r"anomaly\.window must be a number"),
    ({"queue-size": 0}, r"anomaly\.queue-size must be in \[1, 100000\]"),
    ({"in-flight": 2.5}, r"anomaly\.in-flight must be an integer"),
    ({"temperature": -1}, r"anomaly\.temperature must be a number >= 0"),
    ({"speculative": "ngram"}, r"anomaly\.speculative must be one of \['off', 'prompt_lookup', 'draft_model'\]"),
    ({"events": "factory/#/anomaly"}, r"anomaly\.events 'factory/#/anomaly' is not an MQTT topic filter"),
    ({"output": "factory/{line}/explanation"}, r"anomaly\.output .*only \{machine\} and \{sensor\}"),
    ({"errors": "factory/+/errors"}, r"anomaly\.errors .* must be a topic without wildcards"),
    ({"events": "factory/#"}, r"anomaly\.output 'factory/m/s/explanation' matches anomaly\.events"),
    ({"prompt": "missing.jinja"}, r"prompt template .*missing\.jinja \(anomaly\.prompt of .*anomaly\.toml\)"),
])
def test_a_bad_setting_is_refused_naming_the_file_and_key(tmp_path, values, message):
    path = write_config(tmp_path, **values)
    with pytest.raises(RecipeError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_a_bad_prompt_template_is_refused_at_load_naming_the_file_and_line(tmp_path):
    (tmp_path / "p.jinja").write_text("Machine {{ machine }}\n{% if count > 1 %}{{ nonsense }}{% endif %}\n")
    with pytest.raises(RecipeError, match=r"p\.jinja .*line 2.*'nonsense' is undefined"):
        load_config(write_config(tmp_path, prompt="p.jinja"))
    (tmp_path / "p.jinja").write_text("{% if machine %}unclosed\n")
    with pytest.raises(RecipeError, match=r"p\.jinja .*line \d"):
        load_config(write_config(tmp_path, prompt="p.jinja"))


def test_settings_the_service_would_refuse_are_refused_before_it_starts(tmp_path):
    with pytest.raises(RecipeError, match=r"anomaly\.max-tokens is 2000, above the service's --max-tokens 1024"):
        load_config(write_config(tmp_path, **{"max-tokens": 2000})).check_service(TOPICS, 1024)
    with pytest.raises(RecipeError, match="matches the recipe's reply topic 'edgellm/dev1/response/recipe-anomaly"):
        load_config(write_config(tmp_path, events="edgellm/#", status="x/status", errors="x/errors")).check_service(
            TOPICS, 1024)


def test_serve_exits_with_one_line_on_a_bad_recipe_setting_before_loading_the_model(tmp_path, capsys):
    path = write_config(tmp_path, serve={"device-id": "dev1"}, **{"queue-size": -1})
    assert main(["serve", str(tmp_path / "no-such-bundle"), "--recipe", "anomaly", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("edgellm serve: error: ") and f"{path}: anomaly.queue-size" in err


# -- end to end on mosquitto -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_bundle(tiny_bundle_factory) -> Path:
    return tiny_bundle_factory("llama", max_position_embeddings=2048)


@pytest.fixture(scope="module")
def model(long_bundle):
    return edgellm.load(long_bundle)


@contextmanager
def running_recipe(conn, config: AnomalyConfig) -> Iterator[AnomalyRecipe]:
    recipe = AnomalyRecipe(conn, TOPICS, config).start()
    try:
        assert recipe.ready.wait(10), "recipe did not connect/subscribe"
        yield recipe
    finally:
        recipe.stop()


def collect(probe: Probe, match: Callable[[Any], bool], count: int, timeout: float = 60.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    return [probe.wait(match, max(deadline - time.monotonic(), 0.01)) for _ in range(count)]


def on(suffix: str) -> Callable[[Any], bool]:
    return lambda msg: msg.topic.endswith(suffix)


def status_where(condition: Callable[[dict], bool]) -> Callable[[Any], bool]:
    return lambda msg: msg.topic == "factory/anomaly-recipe/status" and condition(payload(msg))


@needs_mosquitto
@pytest.mark.timeout(120)
def test_serve_with_the_recipe_explains_events_with_valid_json_under_matching_ids(broker, probe, long_bundle,
                                                                                 tmp_path):
    """`edgellm serve --recipe anomaly` as a user runs it; MQTT 5 Response Topic to the service."""
    config = write_config(tmp_path, serve={"device-id": "dev1", "max-tokens": 2048},
                          window=0, temperature=1.0, seed=3, **{"max-tokens": 1500})
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", str(long_bundle), "--broker", broker.url,
                             "--recipe", "anomaly", "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        probe.wait(status_where(lambda s: s.get("state") == "online"), timeout=60)
        sent = [event("vibration", 9.4, id="v-1"), event("temperature", 96.0, unit="°C", id="t-1"),
                event("current", 31.0, unit="A", context="motor restarted at 09:58")]
        for data in sent:
            probe.publish(f"factory/press-1/{data['sensor']}/anomaly", data)
        replies = [payload(m) for m in collect(probe, on("/explanation"), 3)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()[-2000:]
        final = probe.wait(status_where(lambda s: s.get("state") == "offline"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    by_sensor = {r["sensor"]: r for r in replies}
    assert by_sensor["vibration"]["id"] == "v-1" and by_sensor["temperature"]["id"] == "t-1"
    assert by_sensor["current"]["id"] == parsed(sent[2]).id  # derived, stable
    complete = 0
    for reply in replies:
        assert reply["machine"] == "press-1" and reply["events"]["count"] == 1
        if reply["incomplete"]:  # honest either way: a cut answer says so and carries no explanation
            assert reply["finish_reason"] == "length" and reply["explanation"] is None
            continue
        jsonschema.validate(reply["explanation"], SCHEMA)
        sent_event = next(parsed(data) for data in sent if data["sensor"] == reply["sensor"])
        found = facts(Group(sent_event, 0.0, 0.0), DEFAULT_BANDS[reply["sensor"]])
        jsonschema.validate({k: v for k, v in reply["explanation"].items() if k != "severity"},
                            request_schema(SCHEMA, found))  # even a random model's: the grammar held it
        assert reply["explanation"]["severity"] == reply["facts"]["severity"] == found.severity
        complete += 1
    assert complete >= 2, replies  # seed 3 finishes well inside the budget on this tiny model
    counts = payload(final)
    assert (counts["received"], counts["explained"], counts["incomplete"], counts["malformed"]) == \
        (3, complete, 3 - complete, 0)


@needs_mosquitto
@pytest.mark.timeout(60)
def test_a_malformed_event_is_reported_and_a_cut_answer_is_published_incomplete_over_mqtt311(broker, probe, model,
                                                                                             tmp_path):
    conn = connection(broker.url, mqtt_version="3.1.1")  # replies come back through reply_to
    config = load_config(write_config(tmp_path, window=0, **{"max-tokens": 6, "max-event-bytes": 1024}))
    with running_service(model, conn), running_recipe(conn, config):
        probe.publish("factory/press-1/temp/anomaly", b"{oops")
        probe.publish("factory/press-1/temp/anomaly", json.dumps(event(id="big", context="x" * 900)).encode())
        probe.publish("factory/press-1/temp/anomaly", event(sensor="temp", id="ok-1"))
        errors = [payload(m) for m in collect(probe, on("/errors"), 2)]
        reply = payload(probe.wait(on("/temp/explanation"), timeout=30))
    assert [e["topic"] for e in errors] == ["factory/press-1/temp/anomaly"] * 2
    assert errors[0]["id"] is None and errors[0]["error"]["code"] == proto.BAD_REQUEST
    assert "not valid JSON" in errors[0]["error"]["message"]
    assert errors[1]["id"] == "big" and errors[1]["error"]["code"] == proto.TOO_LARGE
    assert (reply["id"], reply["incomplete"], reply["finish_reason"], reply["explanation"]) == \
        ("ok-1", True, "length", None)
    assert reply["partial_text"].startswith("{") and reply["usage"]["completion_tokens"] == 6


@needs_mosquitto
@pytest.mark.timeout(90)
def test_a_storm_is_coalesced_and_the_oldest_waiting_group_dropped_as_the_status_says(broker, probe, model,
                                                                                      tmp_path):
    gated = Gated(model)  # holds the service's one generation until the storm has arrived
    config = load_config(write_config(tmp_path, window=1.5, **{"queue-size": 2, "in-flight": 1, "max-tokens": 6}))
    conn = connection(broker.url)
    with running_service(gated, conn), running_recipe(conn, config):
        probe.publish("factory/press-1/a/anomaly", event("a", id="a1"))
        assert gated.started.wait(20)  # a's explanation is at the service, the only one in flight
        for i, value in enumerate((8.0, 6.5, 9.5)):
            probe.publish("factory/press-1/b/anomaly", event("b", value, id=f"b{i}"))
        for i, value in enumerate((50.0, 60.0)):
            probe.publish("factory/press-1/c/anomaly", event("c", value, id=f"c{i}"))
        probe.publish("factory/press-1/d/anomaly", event("d", id="d0"))  # a third waiting group: b's goes
        probe.wait(status_where(lambda s: s["dropped"] == 3 and s["coalesced"] == 3 and s["queued"] == 2))
        gated.gate.set()
        replies = {payload(m)["sensor"]: payload(m) for m in collect(probe, on("/explanation"), 3)}
        final = probe.wait(status_where(lambda s: s["incomplete"] + s["explained"] == 3 and s["in_flight"] == 0))
    assert set(replies) == {"a", "c", "d"}  # b's three events were dropped unexplained
    c = replies["c"]["events"]
    assert (replies["c"]["id"], c["count"], c["ids"], c["min"], c["max"]) == ("c0", 2, ["c0", "c1"], 50.0, 60.0)
    counts = payload(final)
    assert (counts["received"], counts["dropped"], counts["coalesced"], counts["queued"], counts["failed"]) == \
        (7, 3, 3, 0, 0)


# -- the simulator -----------------------------------------------------------------------------------

SIMULATOR = [sys.executable, str(ROOT / "scripts" / "simulate_sensors.py")]


def test_the_simulator_emits_valid_events_for_each_injected_fault_reproducibly():
    args = ["--dry-run", "--duration", "120", "--seed", "5"]
    out = subprocess.run([*SIMULATOR, *args], capture_output=True, text=True, check=True).stdout
    assert out == subprocess.run([*SIMULATOR, *args], capture_output=True, text=True, check=True).stdout
    lines = [line.split(" ", 1) for line in out.splitlines()]
    seen = set()
    for topic, data in lines:
        ev = parsed(data.encode())
        assert topic == f"factory/{ev.machine}/{ev.sensor}/anomaly"
        seen.add((ev.machine, ev.sensor))
    assert seen == {("press-1", "vibration"), ("pump-2", "temperature"), ("mill-3", "current"),
                    ("lathe-4", "temperature")}, seen
    healthy = subprocess.run([*SIMULATOR, *args, "--faults", ""], capture_output=True, text=True, check=True)
    assert healthy.stdout == ""  # no fault, no anomaly: the bands hold the noise


@pytest.mark.skipif(importlib.util.find_spec("amqtt") is None, reason="amqtt is not installed")
def test_the_simulator_falls_back_to_311_on_the_python_broker_and_says_so():
    """amqtt, the broker `EDGELLM_BROKER=python` starts, refuses MQTT 5: the simulator goes on over
    3.1.1 as `edgellm ask` does, in one log line, instead of `cannot connect` after 10 s."""
    from edgellm.service.broker import PYTHON, start_embedded

    python_broker = start_embedded(PYTHON)  # started: `with` would start it again
    try:
        probe = Probe(connection(python_broker.url, mqtt_version="3.1.1"), topics=("factory/#",))
        try:
            proc = subprocess.run([*SIMULATOR, "--broker", python_broker.url, "--rate", "20", "--duration", "1",
                                   "--machines", "1", "--faults", "spike", "--fault-start", "0"],
                                  capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, proc.stderr
            assert "refuses MQTT 5" in proc.stderr and "over MQTT 3.1.1" in proc.stderr, proc.stderr
            first = payload(probe.wait(on("/anomaly")))
            # Asked for MQTT 5 explicitly: no downgrade, a one-line refusal at once, not a 10 s wait.
            explicit = subprocess.run([*SIMULATOR, "--broker", python_broker.url, "--mqtt-version", "5"],
                                      capture_output=True, text=True, timeout=8)
        finally:
            probe.close()
    finally:
        python_broker.close()
    assert (first["machine"], first["sensor"]) == ("press-1", "current")
    assert explicit.returncode == 1 and "unsupported protocol version" in explicit.stderr, explicit.stderr


@needs_mosquitto
def test_the_simulator_publishes_to_a_broker(broker, probe):
    proc = subprocess.run([*SIMULATOR, "--broker", broker.url, "--rate", "20", "--duration", "1", "--machines", "1",
                           "--faults", "spike", "--fault-start", "0"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    first = payload(probe.wait(on("/anomaly")))
    assert (first["machine"], first["sensor"], first["unit"]) == ("press-1", "current", "A") and first["value"] > 16

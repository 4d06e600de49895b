"""The anomaly recipe's settings: the `[anomaly]` table of the `--config` TOML file `edgellm serve` reads.

Everything is checked at load, before the model loads, and every error names the file and
the key, so a typo in a settings file a technician edited is one clear line, not a silent
default or a failure at the first anomaly of the night shift.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import GenerationError, RecipeError, RetrievalError
from ..params import BY_NAME, check
from ..service import protocol as proto
from .facts import Band, facts, request_schema
from .manual import MAX_K, Manual, RetrievalSettings

HERE = Path(__file__).parent
DEFAULT_PROMPT = HERE / "anomaly_prompt.jinja"
SCHEMA: dict[str, Any] = json.loads((HERE / "anomaly_schema.json").read_text(encoding="utf-8"))

# The simulator's sensors (scripts/simulate_sensors.py); a plant lists its own in [anomaly.bands.SENSOR].
DEFAULT_BANDS: dict[str, Band] = {
    "vibration": Band(0.0, 4.5, ("bearing wear", "shaft misalignment", "rotor imbalance", "loose mounting bolts",
                                 "vibration sensor or wiring fault")),
    "temperature": Band(10.0, 75.0, ("cooling fan failure", "blocked air filter", "coolant loss",
                                     "overload heating the motor", "temperature sensor or wiring fault")),
    "current": Band(8.0, 16.0, ("jammed or overloaded drive", "motor winding fault", "supply voltage problem",
                                "current sensor or wiring fault")),
}


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "anomaly_explanation", "schema": schema, "strict": True}}
DEFAULT_SYSTEM = ("You are a maintenance assistant for industrial machines. You explain sensor anomalies to "
                  "technicians in plain words and answer in JSON only.")
TABLE = "anomaly"
SPARKPLUG = "sparkplug"


@dataclass(frozen=True)
class SparkplugConfig:
    """The `[sparkplug]` table: the recipe's explanations also go out as Sparkplug B
    (integrations/sparkplug.py) under `spBv1.0/{group}/.../{node}/{machine}`."""

    group: str = "edgellm"
    node: str | None = None  # default: the service's --device-id
    state_file: Path = Path("sparkplug-bdseq")  # bdSeq kept across restarts, relative to the config file


def load_sparkplug(path: Path | None) -> SparkplugConfig | None:
    """The `[sparkplug]` table of `path`, checked; None when there is none."""
    if path is None:
        return None
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get(SPARKPLUG)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"--config {path}: {exc}") from None
    if table is None:
        return None
    if not isinstance(table, dict):
        raise RecipeError(f"{path}: [{SPARKPLUG}] must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in ("group", "node", "state_file"):
            raise RecipeError(f"{path}: unknown key {SPARKPLUG}.{key} (known: group, node, state-file)")
        if not isinstance(value, str) or not value or (name != "state_file" and not _sparkplug_id(value)):
            what = "a file name" if name == "state_file" else "one topic level without / + # (Sparkplug ids)"
            raise RecipeError(f"{path}: {SPARKPLUG}.{key} must be {what}, got {value!r}")
        values[name] = (path.parent / value).resolve() if name == "state_file" else value
    values.setdefault("state_file", (path.parent / SparkplugConfig.state_file).resolve())
    return SparkplugConfig(**values)


def _sparkplug_id(value: str) -> bool:
    return proto.valid_topic(value) and not {"/", "+", "#"} & set(value)


@dataclass(frozen=True)
class AnomalyConfig:
    events: str = "factory/+/+/anomaly"
    output: str = "factory/{machine}/{sensor}/explanation"
    errors: str = "factory/anomaly-recipe/errors"
    status: str = "factory/anomaly-recipe/status"
    prompt: Path = DEFAULT_PROMPT
    system: str = DEFAULT_SYSTEM
    window: float = 10.0  # seconds in which events of one machine and sensor become one explanation
    queue_size: int = 16  # explanations that may wait; the oldest is dropped beyond this
    in_flight: int = 1  # requests at the service at once: the service's queue stays short, ours drops
    max_tokens: int = 512
    temperature: float = 0.2
    seed: int | None = None
    # Explanations quote their events (names, readings, baselines): drafts from the prompt pay there.
    speculative: str | None = "prompt_lookup"
    max_event_bytes: int = 4096
    timeout: float = 300.0
    bands: dict[str, Band] = field(default_factory=lambda: dict(DEFAULT_BANDS), compare=False)
    retrieval: RetrievalSettings | None = None  # [anomaly.retrieval]: the plant's manual, cited in evidence
    manual: Manual | None = field(default=None, repr=False, compare=False)  # opened from `retrieval` at load
    source: str = "the defaults"  # where these came from, for messages
    template: Template | None = field(default=None, repr=False, compare=False)  # compiled from `prompt`

    def output_topic(self, machine: str, sensor: str) -> str:
        return self.output.format(machine=machine, sensor=sensor)

    def params(self) -> dict[str, Any]:
        """The generation fields of each request, as the service's wire protocol spells them
        (the response_format is each group's own: `facts.request_schema`)."""
        wire = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        optional = {"seed": self.seed, "speculative": self.speculative}
        return {**wire, **{k: v for k, v in optional.items() if v is not None}}

    def check_service(self, topics: proto.Topics, service_max_tokens: int) -> None:
        """What only the service's settings reveal, checked now rather than at every anomaly: the
        service refuses a request over its token ceiling, and an event filter that matches the
        recipe's reply topic would read the service's answers as events."""
        if self.max_tokens > service_max_tokens:
            raise RecipeError(f"{self.source}: {TABLE}.max-tokens is {self.max_tokens}, above the service's "
                              f"--max-tokens {service_max_tokens}")
        if mqtt.topic_matches_sub(self.events, reply_topic(topics)):
            raise RecipeError(f"{self.source}: {TABLE}.events {self.events!r} matches the recipe's reply topic "
                              f"{reply_topic(topics)!r}: it would read the service's answers as events")


def reply_topic(topics: proto.Topics) -> str:
    """Where the service answers the recipe: under `response/`, so the service accepts it, and with
    two levels after it, so no request's default reply topic (`response/{id}`, ids have no '/') is it."""
    return f"{topics.response('recipe-anomaly')}/replies"


# key -> (kind, low, high); kinds: "topic", "filter", "template", "path", "str", "int", "float", "param"
_KEYS: dict[str, tuple[str, float | None, float | None]] = {
    "events": ("filter", None, None),
    "output": ("template", None, None),
    "errors": ("topic", None, None),
    "status": ("topic", None, None),
    "prompt": ("path", None, None),
    "system": ("str", None, None),
    "window": ("float", 0, 3600),
    "queue_size": ("int", 1, 100_000),
    "in_flight": ("int", 1, 8),
    "max_tokens": ("param", None, None),
    "temperature": ("param", None, None),
    "seed": ("param", None, None),
    "speculative": ("param", None, None),
    "max_event_bytes": ("int", 64, 65536),
    "timeout": ("float", 1, 86400),
    "bands": ("bands", None, None),
    "retrieval": ("retrieval", None, None),
}
_PARAM_NAMES = {"max_tokens": "max_new_tokens", "temperature": "temperature", "seed": "seed",
                "speculative": "speculative"}


def load_config(path: Path | None) -> AnomalyConfig:
    """The `[anomaly]` table of `path` over the defaults (all defaults when `path` is None or has no table)."""
    if path is None:
        return _checked(_with_template(AnomalyConfig(), None))
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get(TABLE, {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"--config {path}: {exc}") from None
    if not isinstance(table, dict):
        raise RecipeError(f"{path}: [{TABLE}] must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in _KEYS:
            raise RecipeError(f"{path}: unknown key {TABLE}.{key} (known: {', '.join(_spelled(k) for k in _KEYS)})")
        values[name] = _value(path, name, value)
    if "bands" in values:
        values["bands"] = {**DEFAULT_BANDS, **values["bands"]}
    config = AnomalyConfig(**values, source=str(path))
    _check_topics(config)
    return _with_manual(_checked(_with_template(config, path)))


def _with_manual(config: AnomalyConfig) -> AnomalyConfig:
    """`config` with its manual open: the index there and not empty, its embedding bundle loaded
    and the one it was built with, all said now rather than at the first anomaly."""
    if config.retrieval is None:
        return config
    try:
        return dataclasses.replace(config, manual=Manual(config.retrieval, f"{config.source}: {TABLE}.retrieval"))
    except RetrievalError as exc:
        raise RecipeError(str(exc)) from None


def _checked(config: AnomalyConfig) -> AnomalyConfig:
    """Puts each band's per-event grammar, built for a sample group, through the check a request's
    response_format gets (its shape, nesting and JSON), so a band whose grammar no request could
    carry is refused before the model loads. llguidance compiles each group's own grammar (its
    names and numbers) when that group's request runs."""
    from .events import Event, Group

    for sensor, band in [*config.bands.items(), ("(no band)", None)]:
        sample = Group(Event("ev-1", "m", sensor, band.high + 1 if band else 1.0, band.high if band else 0.0, "u",
                             "2025-01-01T00:00:00Z"), 0.0, 0.0)
        try:
            check(BY_NAME["response_format"], response_format(request_schema(SCHEMA, facts(sample, band))))
        except GenerationError as exc:
            raise RecipeError(f"{config.source}: {TABLE}.bands.{sensor}: {exc}") from None
    return config


def _bands(where: str, value: Any) -> dict[str, Band]:
    """`[anomaly.bands.SENSOR]` tables: low < high, causes 1-16 phrases of 1-120 characters."""
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must be a table of [{TABLE}.bands.SENSOR] tables")
    bands = {}
    for sensor, table in value.items():
        at = f"{where}.{sensor}"
        if not isinstance(table, dict) or set(table) - {"low", "high", "causes"} or not {"low", "high"} <= set(table):
            raise RecipeError(f"{at} must be a table with low, high and optionally causes")
        low, high, causes = table["low"], table["high"], table.get("causes", [])
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
                or not low < high:
            raise RecipeError(f"{at}: low and high must be numbers with low < high, got {low!r}, {high!r}")
        if not isinstance(causes, list) or len(causes) > 16 or not all(
                isinstance(c, str) and 0 < len(c) <= 120 and c.isprintable() for c in causes):
            raise RecipeError(f"{at}.causes must be a list of at most 16 phrases of 1-120 characters")
        bands[sensor] = Band(float(low), float(high), tuple(causes))
    return bands


def _retrieval(path: Path, where: str, value: Any) -> RetrievalSettings:
    """`[anomaly.retrieval]`: index (required) and embedding, paths relative to the settings file; k."""
    if not isinstance(value, dict) or set(value) - {"index", "embedding", "k"} or "index" not in value:
        raise RecipeError(f"{where} must be a table with index and optionally embedding and k")
    paths = {}
    for key in ("index", "embedding"):
        if key in value:
            if not isinstance(value[key], str) or not value[key]:
                raise RecipeError(f"{where}.{key} must be a non-empty path, got {value[key]!r}")
            paths[key] = (path.parent / value[key]).resolve()
    k = value.get("k", RetrievalSettings.k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise RecipeError(f"{where}.k must be an integer in [1, {MAX_K}], got {k!r}")
    return RetrievalSettings(paths["index"], paths.get("embedding"), k)


def _spelled(name: str) -> str:
    return name.replace("_", "-")


def _value(path: Path, name: str, value: Any) -> Any:
    kind, low, high = _KEYS[name]
    where = f"{path}: {TABLE}.{_spelled(name)}"
    if kind == "param":
        try:
            return check(BY_NAME[_PARAM_NAMES[name]], value, field=f"{TABLE}.{_spelled(name)}")
        except GenerationError as exc:
            raise RecipeError(f"{path}: {exc}") from None
    if kind == "bands":
        return _bands(where, value)
    if kind == "retrieval":
        return _retrieval(path, where, value)
    if kind in ("int", "float"):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (kind == "int" and not isinstance(value, int)) or not math.isfinite(value):
            raise RecipeError(f"{where} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        if not low <= value <= high:  # type: ignore[operator]
            raise RecipeError(f"{where} must be in [{low}, {high}], got {value!r}")
        return float(value) if kind == "float" else value
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where} must be a non-empty string, got {value!r}")
    if kind == "path":
        return (path.parent / value).resolve()  # relative to the settings file, wherever serve runs
    if kind == "filter" and not valid_filter(value):
        raise RecipeError(f"{where} {value!r} is not an MQTT topic filter ('+' and '#' only as whole levels, "
                          "'#' last)")
    if kind == "topic" and not proto.valid_topic(value):
        raise RecipeError(f"{where} {value!r} must be a topic without wildcards, not starting with '$'")
    if kind == "template":
        try:
            sample = value.format(machine="m", sensor="s")
        except (KeyError, IndexError, ValueError) as exc:
            raise RecipeError(f"{where} {value!r}: only {{machine}} and {{sensor}} may be filled in ({exc!r})") \
                from None
        if not proto.valid_topic(sample):
            raise RecipeError(f"{where} {value!r} must give a topic without wildcards, not starting with '$'")
    return value


def valid_filter(value: str) -> bool:
    levels = value.split("/")
    return (0 < len(value.encode("utf-8")) <= 1024 and "\0" not in value
            and all(level in ("+", "#") or not ({"+", "#"} & set(level)) for level in levels)
            and "#" not in levels[:-1])


def _check_topics(config: AnomalyConfig) -> None:
    """A topic the recipe publishes to must not match its own event filter: it would read its
    own explanations as (malformed) events, report them, read those reports, ..."""
    for name, topic in (("output", config.output_topic("m", "s")), ("errors", config.errors),
                        ("status", config.status)):
        if mqtt.topic_matches_sub(config.events, topic):
            raise RecipeError(f"{config.source}: {TABLE}.{name} {topic!r} matches {TABLE}.events "
                              f"{config.events!r}: the recipe would read its own messages as events")


def _with_template(config: AnomalyConfig, path: Path | None) -> AnomalyConfig:
    """`config` with its prompt template compiled and tried on a sample event, so an unknown
    variable or a syntax error is found now, naming the template file and line."""
    where = f"{config.prompt}" if path is None or config.prompt == DEFAULT_PROMPT else \
        f"{config.prompt} ({TABLE}.prompt of {path})"
    try:
        source = config.prompt.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"prompt template {where}: {exc}") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    try:
        template = env.from_string(source)
        for sample in SAMPLES:
            template.render(**sample)
    except TemplateError as exc:
        line = template_line(exc)
        raise RecipeError(f"prompt template {where}{f' line {line}' if line else ''}: {exc}") from None
    return dataclasses.replace(config, template=template)


def template_line(exc: TemplateError) -> int | None:
    """The template line at fault: a syntax error carries it, a render error only in its traceback
    (Jinja rewrites the template's frames to the template's own line numbers)."""
    line = getattr(exc, "lineno", None)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# What a template may use; kept here so the load-time trial render and the docs agree (see
# docs/anomaly.md). `events.Group.variables` fills the same names.
SAMPLE_VARIABLES: dict[str, Any] = {
    "id": "ev-1", "machine": "press-3", "sensor": "vibration", "unit": "mm/s", "value": 9.1, "baseline": 2.8,
    "deviation": 6.3, "deviation_pct": 225.0, "timestamp": "2025-01-01T00:00:00Z", "context": "shift B",
    "count": 2, "min_value": 7.5, "max_value": 9.1, "first_timestamp": "2025-01-01T00:00:00Z",
    "last_timestamp": "2025-01-01T00:00:05Z", "ids": ["ev-0", "ev-1"],
    "severity": "critical", "worst": 9.1, "low": 0.0, "high": 4.5, "causes": ["bearing wear"],
    "facts": ["press-3 vibration reached 9.1 mm/s"],
    "sections": [{"id": "M1", "text": "manual.md, Vibration alarms > Bearing wear: A worn bearing ..."}],
}
# Both sides of the branches a template is likely to have: one event, no context, a zero baseline.
SAMPLES = (SAMPLE_VARIABLES, {**SAMPLE_VARIABLES, "count": 1, "ids": ["ev-1"], "context": None, "baseline": 0.0,
                              "deviation": 9.1, "deviation_pct": None,
                                              "low": None, "high": None, "causes": [], "sections": []})

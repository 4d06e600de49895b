"""What the data already decides about a group of events, computed, never asked of the model.

A 135M model asked for a severity says "low" for 95 °C against a 75 °C limit, and asked for
evidence writes "./A". So the recipe works out the severity from the sensor's band and how far
the worst reading left it, states the facts (machine, sensor, range, counts, times) itself, and
gives the model a per-event grammar (`request_schema`) in which evidence can only be those facts
(after one retrieved manual section's id, when the recipe has a manual), causes only the sensor's
configured causes, and the two sentences, written after those, words in at most three clauses
and the group's own numbers, ending at a full stop (the summary opening with the machine and
sensor): no number or name the events do not hold.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Sequence

from .events import Group

SEVERITIES = ("low", "medium", "high", "critical")
# How far the worst reading is past the limit it crossed, as a fraction of the baseline's distance
# to that limit: below 0.2 low, below 0.5 medium, below 1.25 high, else critical. 95 °C against a
# 55 °C baseline and a 75 °C limit is 1.0 (high); 9 mm/s against 2.2 and 4.5 is 2.0 and 30 A
# against 12 and 16 is 3.5 (critical); a sensor reading 0 °C against 55 and 10 is 0.22 (medium).
STEPS = (0.2, 0.5, 1.25)
# A sentence of words that ends with a full stop: no quotes or line breaks, a comma or semicolon
# only after a word, and no digits but those of the group's own numbers and machine name, each a
# word of its own (so "pump- 10" can never read as a machine "pump-10"); at most the schema's
# maxLength. A word is at most WORD_MAX letters, so a sentence that stops further than
# WORD_MAX + 2 characters short of maxLength stopped where the model chose: another word fitted.
WORD_MAX = 20
CLAUSES = 3  # parts between commas or semicolons, so a sentence cannot go on listing readings or steps
LETTERS = r"[A-Za-z()'/°-]"
# The order the model writes the fields in: the causes and the evidence (with a manual, the
# section) first, so the sentences come after them and need not list them.
ORDER = ("likely_causes", "evidence", "summary", "recommended_action")
PHRASE = r"^[A-Za-z][A-Za-z'/-]*( [A-Za-z][A-Za-z'/-]*){1,8}$"  # 2-9 words, for a sensor with no causes listed


@dataclass(frozen=True)
class Band:
    """A sensor's normal band and the physical causes the plant knows for leaving it."""

    low: float
    high: float
    causes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Facts:
    severity: str
    excess: float  # the worst reading's distance past the limit, in units of the baseline's distance to it
    worst: float  # the reading furthest outside the band
    band: Band | None
    evidence: tuple[str, ...]  # the fact sentences the model's evidence is chosen from
    literals: tuple[str, ...] = ()  # the numbers and the machine name the model's sentences may write
    subject: str = ""  # machine and sensor ("pump-2 temperature"): what the summary is about


def variables(found: Facts, sections: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The prompt template's computed variables (docs/anomaly.md lists them); `sections` are
    the retrieved manual sections as (id, text) pairs, none without [anomaly.retrieval]."""
    band = found.band
    return {"severity": found.severity, "worst": found.worst, "low": band.low if band else None,
            "high": band.high if band else None, "causes": list(band.causes) if band else [],
            "facts": list(found.evidence), "sections": [{"id": i, "text": t} for i, t in sections]}


def severity_of(excess: float) -> str:
    return SEVERITIES[sum(excess >= step for step in STEPS)]


def _num(value: float) -> str:
    return f"{value:g}"


def facts(group: Group, band: Band | None) -> Facts:
    """The severity and the facts of `group`. Without a band the limit is the baseline itself and
    the excess the deviation in baseline units (|value - baseline| / |baseline|)."""
    last, unit = group.last, group.last.unit
    baseline = last.baseline
    if band is None:
        scale = abs(baseline) or 1.0
        worst = max((group.low, group.high), key=lambda v: abs(v - baseline))
        excess = abs(worst - baseline) / scale
    else:
        below = (band.low - group.low) / max(baseline - band.low, 1e-9)
        above = (group.high - band.high) / max(band.high - baseline, 1e-9)
        worst, excess = (group.low, below) if below > above else (group.high, above)
        excess = max(excess, 0.0)
    where = f"{group.first.machine} {group.first.sensor}"
    times = (f"at {group.first.timestamp}" if group.count == 1 else
             f"from {group.first.timestamp} to {last.timestamp}")
    readings = "1 reading" if group.count == 1 else f"{group.count} readings"
    evidence = [f"{where} reached {_num(worst)} {unit}".rstrip(),
                f"{readings} outside the band {times}"[:120],
                f"baseline {_num(baseline)} {unit}".rstrip()]
    if band is not None:
        evidence.insert(1, f"normal band {_num(band.low)} to {_num(band.high)} {unit}".rstrip())
    if group.count > 1:
        evidence.append(f"readings from {_num(group.low)} to {_num(group.high)} {unit}".rstrip())
    numbers = [worst, baseline, group.low, group.high, *((band.low, band.high) if band else ())]
    # Each number as the facts spell it (55) and as the prompt shows it (55.0): a model copying "55.0"
    # must not have its sentence ended at "55." by the grammar.
    literals = dict.fromkeys([group.first.machine, str(group.count), *map(_num, numbers), *map(str, numbers)])
    return Facts(severity_of(excess), excess, worst, band, tuple(evidence), tuple(literals), where)


def sentence(found: Facts, opening: str = "") -> str:
    """The pattern of one sentence about `found`'s group (see WORD_MAX), beginning with `opening`."""
    literals = "".join(f"|{re.escape(literal)}" for literal in sorted(found.literals, key=len, reverse=True))
    word = rf"(?:{LETTERS}{{1,{WORD_MAX}}}{literals})"
    clause = rf"(?: {word})*"
    first = re.escape(opening) if opening else rf"[A-Z]{LETTERS}{{0,{WORD_MAX - 1}}}"
    return rf"^{first}{clause}(?:[,;] {word}{clause}){{0,{CLAUSES - 1}}}\.$"


def request_schema(schema: dict[str, Any], found: Facts, sections: Sequence[str] = ()) -> dict[str, Any]:
    """The grammar of one request: `schema` (the published explanation's shape) without the
    computed severity, evidence one retrieved section id (when there are `sections`) then items of
    `found.evidence`, causes one of the band's causes (or a short phrase of words), the sentences
    as `sentence` within the schema's lengths, in ORDER."""
    out = copy.deepcopy(schema)
    props = out["properties"]
    del props["severity"]
    out["required"] = [key for key in out["required"] if key != "severity"]
    # The summary opens with what it is about, "The pump-2 temperature", as the prompt's example does:
    # a summary that set off elsewhere could retell the prompt's readings to the length limit. Not
    # when the names take more than half its room (two 64-character names): llguidance then cannot
    # tell that the pattern fits maxLength, and the request would be refused.
    opening = f"The {found.subject}" if found.subject else ""
    opening = opening if len(opening) <= props["summary"]["maxLength"] // 2 else ""
    for key, first in (("summary", opening), ("recommended_action", "")):
        props[key] = {**props[key], "minLength": 20, "pattern": sentence(found, first)}
    causes = list(found.band.causes) if found.band is not None and found.band.causes else None
    props["likely_causes"]["items"] = {"enum": causes} if causes else {"type": "string", "pattern": PHRASE}
    props["evidence"]["items"] = {"enum": list(found.evidence)}
    if sections:  # found for this group: the answer names the one that fits first, and only one
        props["evidence"]["prefixItems"] = [{"enum": list(sections)}]
    out["properties"] = {key: props[key] for key in ORDER}
    return out

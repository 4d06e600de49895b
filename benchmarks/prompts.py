"""The benchmark's prompts: fixed texts of a chosen token length, and their token ids.

Every engine gets the same ids. They are computed once with the bundle's own
tokenizer (edgellm's, built from the GGUF metadata), so peers whose tokenizer
differs still run the identical token sequence; edgellm gets the text and its
usage.prompt_tokens is checked against these ids' length.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from edgellm.runtime.bundle import read_manifest
from edgellm.text import Tokenizer

# Plain sentences in the register of the product (sensor fleets); shuffled with a fixed
# seed so a long prompt does not repeat one sentence back to back.
_SENTENCES = (
    "The greenhouse controller reads soil moisture every ten minutes and opens the valves when it drops.",
    "A gateway in the barn forwards temperature readings from twelve sensors over a single radio link.",
    "Battery powered nodes sleep most of the time and wake only to send a short report.",
    "When the wind speed passes the threshold, the turbine brakes and the operator gets an alert.",
    "The maintenance log shows that the pump on the east side was replaced in early spring.",
    "Each device publishes its status on its own topic, and the broker keeps the last message.",
    "Firmware updates are rolled out to one building first, then to the rest of the site.",
    "Humidity in the storage room stayed between forty and fifty percent for the whole week.",
    "The camera on the loading dock counts pallets and reports the total at the end of each shift.",
    "A small language model on the edge board answers questions about the readings without the cloud.",
    "Operators asked for shorter answers, so the assistant now replies in one or two sentences.",
    "Power cuts are rare, but the board restarts cleanly and resumes serving requests within a minute.",
)

QUESTIONS = (
    "Which sensors reported a fault today?",
    "Summarise the maintenance history in two sentences.",
)


@dataclass(frozen=True)
class Prompt:
    text: str  # raw prompt, chat markup already applied
    ids: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def filler(tokenizer: Tokenizer, tokens: int, seed: int = 0) -> str:
    """About `tokens` tokens of plain text, cut at a token boundary."""
    rng = random.Random(seed)
    parts: list[str] = []
    while len(tokenizer.encode(" ".join(parts), add_special_tokens=False)) < tokens:
        batch = list(_SENTENCES)
        rng.shuffle(batch)
        parts.extend(batch)
    ids = tokenizer.encode(" ".join(parts), add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids, skip_special_tokens=False).strip()


def chatml(system: str | None, user: str) -> str:
    """ChatML, as SmolLM2 and Qwen expect; written out so every engine sees one string."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


class PromptSet:
    """Builds every prompt of one benchmark run from one tokenizer."""

    def __init__(self, bundle: Path) -> None:
        manifest = read_manifest(bundle, verify=False)
        self.tokenizer = Tokenizer.from_bundle(bundle, manifest.generation)

    def make(self, text: str) -> Prompt:
        return Prompt(text, self.tokenizer.encode(text))

    def plain(self, tokens: int, seed: int = 0) -> Prompt:
        """A user message whose whole prompt is about `tokens` tokens."""
        return self.make(chatml(None, filler(self.tokenizer, max(tokens - 10, 1), seed)))

    def shared_prefix(self, system_tokens: int, run: int) -> tuple[Prompt, Prompt]:
        """Two requests sharing one system prompt; `run` makes each pair's prefix new to every cache."""
        system = f"Site report {run}. " + filler(self.tokenizer, system_tokens, seed=100 + run)
        return self.make(chatml(system, QUESTIONS[0])), self.make(chatml(system, QUESTIONS[1]))

    def eval_ids(self, text: str, limit: int) -> list[int]:
        """The ids the export's perplexity gate scores: same text, BOS rule and cut."""
        return self.tokenizer.encode(text)[:limit]

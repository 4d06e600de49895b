"""How `edgellm run`, `chat` and `ask` print an answer, whether it comes from the Python
API or over MQTT: the text on stdout as it streams, a think block on stderr (so a pipe
gets the answer alone), tool calls as one JSON line each on stdout once the answer ends."""
from __future__ import annotations

import json
import sys
from typing import Any, Sequence


class AnswerPrinter:
    def __init__(self) -> None:
        self._thinking = False
        self._started = False  # anything of this answer printed yet

    def restart(self) -> None:
        """The service was restarted mid-answer and answers again from the start (an MQTT reply
        flagged `restart`): what was printed cannot be taken back, so end its line and say so."""
        if self._started:
            self.finish()
            sys.stderr.write("[the service restarted; its answer starts over]\n")
            sys.stderr.flush()
            self._started = False

    def reasoning(self, delta: str) -> None:
        if not delta:
            return
        self._started = True
        if not self._thinking:
            sys.stderr.write("[reasoning] ")
            self._thinking = True
        sys.stderr.write(delta)
        sys.stderr.flush()

    def text(self, delta: str) -> None:
        if not delta:
            return
        self._started = True
        self._end_reasoning()
        sys.stdout.write(delta)
        sys.stdout.flush()

    def finish(self, tool_calls: Sequence[dict[str, Any]] = ()) -> None:
        """End the answer's line and print its calls; before the caller's stats line on stderr."""
        self._end_reasoning()
        sys.stdout.write("\n")
        for call in tool_calls:
            sys.stdout.write(json.dumps(call, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def _end_reasoning(self) -> None:
        if self._thinking:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._thinking = False

"""One exception type per user-facing failure family; messages name the file, field or value."""
from __future__ import annotations


class EdgeLLMError(Exception):
    """Base of every error edgellm reports to a user as one line."""


class BundleError(EdgeLLMError):
    """A bundle directory is missing, incomplete, corrupt or of an unknown format."""


class ExportError(EdgeLLMError):
    """A source model cannot be exported (unknown architecture, corrupt file, bad output path)."""


class GenerationError(EdgeLLMError):
    """A generation request cannot be run (prompt too long, bad sampling parameter).

    `field` is the request parameter at fault by its Python API name (`max_new_tokens`,
    `messages`, `response_format`; None: the request as a whole), and the message starts
    with it: a front spells it as its clients do (`params.spelled`), never guessing it from
    the message."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ContextLengthError(GenerationError):
    """The prompt needs more tokens than the model's context holds (OpenAI's
    `context_length_exceeded`), whether found before the queue or once tokenized."""


class GrammarError(GenerationError):
    """A response_format or grammar is malformed, invalid or unsatisfiable (the message names
    its JSON path), or constrained decoding is asked for without llguidance installed."""


class RetrievalError(EdgeLLMError):
    """A document cannot be read, or an index file is unusable or was built by another embedding
    model; the message names the file."""


class BrokerError(EdgeLLMError):
    """The embedded broker cannot be found or does not start."""


class RecipeError(EdgeLLMError):
    """A recipe's settings file, prompt template or schema is unusable; the message names the file and key."""


class RequestError(EdgeLLMError):
    """A service request is invalid; `code` is stable and goes on the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


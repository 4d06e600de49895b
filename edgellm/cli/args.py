"""Command-line arguments shared by `edgellm run/chat` and `edgellm serve/ask`.

Both the CLI and the service commands import this module, never each other. The
sampling flags come from the parameter declaration (`edgellm.params`), so a flag
takes exactly what the Python API and the MQTT request take.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import GenerationError
from ..params import BY_NAME, CHOICE, INT, NUMBER, PARAMS, STRINGS, check_all, check_together, spelled


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle directory written by `edgellm export`")
    p.add_argument("--profile", help="device profile name or .toml path (see `edgellm devices`)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: profile's)")
    p.add_argument("--max-context", type=int, help="KV cache size in tokens (default: profile's, at most the model's)")
    p.add_argument("--provider", action="append", dest="providers",
                   help="execution provider to try, in order (repeatable); CPU is always the last fallback")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification (slow storage)")
    p.add_argument("--draft", type=Path, metavar="BUNDLE",
                   help="a smaller bundle with the same tokenizer, for --speculative draft_model")


def _integer(text: str) -> int | float:
    # "2.0" is an integer to the parameter contract (as in JSON); the check says why "2.5" is not.
    try:
        return int(text)
    except ValueError:
        return float(text)


_TYPES = {INT: _integer, NUMBER: float}
# Parameters whose value is a JSON document: their flags take a file (or a name), not the value.
DOCUMENT_FLAGS = {"response_format": "--json-schema", "tools": "--tools", "tool_choice": "--tool-choice"}


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: the bundle's defaults, else greedy)")
    for param in PARAMS:
        if not param.cli:
            continue
        flags = (param.short, param.flag) if param.short else (param.flag,)
        bounds = f" ({param.range()})" if param.range() else ""
        if param.kind == STRINGS:
            g.add_argument(*flags, dest=param.name, action="append", help=param.help + " (repeatable)")
        elif param.kind == CHOICE:
            g.add_argument(*flags, dest=param.name, choices=param.choices, help=param.help)
        else:
            g.add_argument(*flags, dest=param.name, type=_TYPES[param.kind], help=param.help + bounds)
    g.add_argument("--system", help="system prompt (chat template)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g = p.add_argument_group("output a program can use (needs edgellm[grammar])")
    g.add_argument("--json-schema", type=Path, metavar="FILE",
                   help="answer with JSON that validates against this JSON Schema file")
    g.add_argument("--tools", type=Path, metavar="FILE",
                   help="JSON file with a list of OpenAI function tools the model may call; "
                        "calls are printed as JSON lines")
    g.add_argument("--tool-choice", metavar="CHOICE",
                   help="auto (default with --tools), none, required, or the name of one tool to call")


def sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling and output flags given, by API name, validated (GenerationError names the bad one)."""
    params = {p.name: getattr(args, p.name) for p in PARAMS if p.cli and getattr(args, p.name) is not None}
    if args.json_schema is not None:
        schema = _read_json(args.json_schema, "--json-schema")
        params["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": args.json_schema.stem, "schema": schema}}
    if args.tools is not None:
        params["tools"] = _read_json(args.tools, "--tools")
    if args.tool_choice is not None:
        choice = args.tool_choice
        params["tool_choice"] = choice if choice in ("auto", "none", "required") else {
            "type": "function", "function": {"name": choice}}
    flags = {p.name: DOCUMENT_FLAGS.get(p.name) or p.flag for p in PARAMS}
    try:
        checked = check_all(params)
    except GenerationError as exc:  # named as the command line spells it, as each front names its fields
        raise GenerationError(spelled(exc, flags), field=exc.field) from None
    check_together(checked, flags.__getitem__)
    return checked


def _read_json(path: Path, flag: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerationError(f"{flag} {path}: {exc}") from None


def load_model(args: argparse.Namespace):
    from .. import load  # onnxruntime loads here, not for --help

    model = load(args.bundle, profile=args.profile, providers=args.providers, threads=args.threads,
                 max_context=args.max_context, verify=not args.no_verify, draft=args.draft)
    if model.manifest.graph.kind == "embedding":
        raise ValueError(f"{args.bundle}: an embedding bundle, which embeds texts and generates none: serve it "
                         f"beside a generative bundle with --embedding {args.bundle}, or search with edgellm index")
    return model

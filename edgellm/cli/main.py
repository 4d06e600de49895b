"""`edgellm`: thin command line over the Python API. Parse, call, print.

Every error a user can cause ends as one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .. import __version__
from .args import add_load_arguments, add_sampling_arguments, load_model, sampling_params
from .console import AnswerPrinter
from ..errors import EdgeLLMError
from .index import add_index_arguments, run_index
from .commands import (add_ask_arguments, add_demo_arguments, add_serve_arguments, run_ask, run_demo,
                       run_serve)

if TYPE_CHECKING:
    from ..sequence import Result


def _stream_to_stdout(model, request, params: dict[str, Any]) -> "Result":
    """Print the answer as it comes; return the whole Result (the last chunk's)."""
    printer = AnswerPrinter()
    for chunk in model.stream(request, **params):
        printer.reasoning(chunk.reasoning)
        printer.text(chunk.text)
    printer.finish(chunk.result.tool_calls)  # before the stats line goes to stderr
    return chunk.result


def _stats(result: "Result") -> str:
    u = result.usage
    return (f"[{result.finish_reason}] prompt {u.prompt_tokens} tok ({u.cached_prompt_tokens} cached), "
            f"completion {u.completion_tokens} tok, ttft {u.ttft_s * 1000:.0f} ms, "
            f"{u.decode_tokens_per_s:.1f} tok/s")


def cmd_run(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # a bad flag fails before the slow load
    if args.index is not None:
        if args.raw:
            raise ValueError("--index puts its sources in the chat's system turn: it cannot go with --raw")
        params["retrieval"] = {"index": str(args.index), "k": args.sources}  # as a served request names one
    model = load_model(args)
    if args.raw:
        request: Any = args.prompt
    else:
        request = ([{"role": "system", "content": args.system}] if args.system else [])
        request.append({"role": "user", "content": args.prompt})
    if args.index is not None:
        model.retriever = _retriever(args.index)
    result = _stream_to_stdout(model, request, params)
    if result.citations:
        print("\nsources:")
        for c in result.citations:
            print(f"[{c['n']}]{'*' if c['cited'] else ' '} {c['path']}:{c['line']}"
                  + (f"  {c['heading']}" if c["heading"] else ""))
    print(_stats(result), file=sys.stderr)
    return 0


def _retriever(index_path: Path) -> Any:
    """The --index file, served under its own path, with the embedding bundle it remembers: the
    request's `retrieval` then grounds the chat as a served request's does."""
    from ..retrieval.embed import Embedder
    from ..retrieval.index import Index, open_encoder
    from ..retrieval.retriever import Retriever

    if not index_path.is_file():
        raise ValueError(f"--index {index_path}: no such index (create it with edgellm index add)")
    with Index(index_path) as index:
        encoder = open_encoder(index, None)
    return Retriever({str(index_path): index_path}, Embedder(encoder))


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    model = load_model(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print(f"edgellm chat with {model.manifest.name} — empty line or Ctrl-D to quit, /reset to clear history",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            print("[history cleared" + ("; the system prompt stays]" if args.system else "]"), file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        # The model keeps the previous turn's KV: only the new turn is prefilled.
        result = _stream_to_stdout(model, history, params)
        calls = result.tool_calls
        history.append({"role": "assistant", "content": result.text, **({"tool_calls": calls} if calls else {})})
        print(_stats(result), file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..runtime.bundle import bundle_file, read_manifest, verify_files

    m = read_manifest(args.bundle, verify=False)
    verified = [] if args.no_verify else verify_files(args.bundle, m)
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    s, q = m.spec, m.quantization
    size = sum(bundle_file(args.bundle, f).stat().st_size for f in m.files)
    rows = [
        ("name", m.name),
        ("source", f"{m.source.get('kind', '?')} {m.source.get('path', '')}"),
        ("architecture", f"{s.arch}: {s.num_layers} layers, hidden {s.hidden_size}, heads {s.num_heads}/"
                         f"{s.num_kv_heads} kv, head dim {s.head_dim}, vocab {s.vocab_size}"),
        ("context", f"{s.max_context} tokens" + ("" if m.graph.kind == "embedding" else f", rope theta "
                    f"{s.rope_theta:g}" + (f", scaling {s.rope_scaling}" if s.rope_scaling else ""))),
        ("graph", f"{m.graph.kind} ({m.graph.file}), " + (
            f"{m.graph.pooling} pooling{', normalised' if m.graph.normalize else ''}, "
            f"{m.graph.dimensions} dimensions" if m.graph.kind == "embedding" else f"kv {m.graph.kv_dtype}")),
        ("weights", f"{q.get('weights')}" + (f", block {q['block_size']}, "
                    f"{'symmetric' if q.get('symmetric') else 'asymmetric'}" if q.get("block_size") else "")),
        ("size", f"{size / 2**20:.1f} MiB in {len(m.files)} files, "
                 + (f"sha256 verified ({len(verified)}/{len(m.files)})" if not args.no_verify
                    else "checksums not verified (--no-verify)")),
    ]
    if "min_cosine" in m.quality:
        rows.append(("cosine", f"at least {m.quality['min_cosine']:.5f} to the source (mean {m.quality['mean_cosine']:.5f}, "
                               f"limit {m.quality['limit']})"))
    elif m.quality:
        rows.append(("perplexity", f"{m.quality['perplexity']:.3f} vs source {m.quality['source_perplexity']:.3f} "
                                   f"({m.quality['ratio']:.3f}x)"))
    rows.append(("exporter", ", ".join(f"{k} {v}" for k, v in m.exporter.items())))
    for key, value in rows:
        print(f"{key:>13}  {value}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edgellm.export.cli import run

    return run(args)


def cmd_devices(args: argparse.Namespace) -> int:
    from ..runtime.devices import detect, list_profiles, load_profile

    if args.name:
        print(json.dumps(load_profile(args.name).to_dict(), indent=2))
        return 0
    here = detect()
    for name in list_profiles():
        mark = "*" if name == here.name else " "
        print(f"{mark} {name:<18} {load_profile(name).description}")
    print(f"(* detected on this machine: {here.name})")
    from ..runtime.providers import available_devices  # onnxruntime loads here, not for the profile list

    print("\nexecution providers and devices on this machine:")
    for provider, kind, vendor in available_devices():
        print(f"  {provider:<28} {kind or '-':<4} {vendor}")
    return 0


# What `edgellm service FILE` prints: the files ship in the wheel next to the device profiles
# (devices/ in a checkout), so a board that installed only the wheel needs no checkout.
SERVICE_FILES = {"unit": "edgellm.service", "env": "edgellm.env"}


def cmd_service(args: argparse.Namespace) -> int:
    from ..runtime.devices import _profile_dir

    sys.stdout.write((_profile_dir() / SERVICE_FILES[args.file]).read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgellm",
        description="Run small open language models on edge boards and serve them to devices over MQTT. "
        "Typical flow: `edgellm demo` (or `edgellm export smollm2-135m -o bundles/smollm2-135m`) once, "
        "then `edgellm run bundles/smollm2-135m \"...\"` or `edgellm serve bundles/smollm2-135m`.",
    )
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    try:
        from edgellm.export.cli import add_arguments as add_export_arguments
    except ImportError:  # the export extra is not installed: say so when used
        add_export_arguments = None
    p = add("export", cmd_export, "turn a Hugging Face folder or GGUF file into a bundle (needs edgellm[export])")
    if add_export_arguments:
        add_export_arguments(p)

    p = add("run", cmd_run, "answer one prompt, streamed to stdout; stats on stderr")
    add_load_arguments(p)
    p.add_argument("prompt")
    add_sampling_arguments(p)
    p.add_argument("--index", type=Path, metavar="FILE",
                   help="answer from this document index (edgellm index): the chunks nearest the prompt go into "
                        "the chat as numbered sources, listed after the answer (* where it cites them)")
    p.add_argument("--sources", type=int, default=4, metavar="K", help="how many chunks --index gives (default 4)")

    p = add("chat", cmd_chat, "interactive chat that keeps history and reuses its KV cache")
    add_load_arguments(p)
    add_sampling_arguments(p)

    p = add("info", cmd_info, "summarise a bundle's manifest and verify its checksums")
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification")

    p = add("devices", cmd_devices, "list device profiles (and the one detected here), or show one")
    p.add_argument("name", nargs="?", help="profile to show")

    p = add("service", cmd_service, "print the systemd unit or its settings file, to install on a board "
            "(e.g. `edgellm service unit | sudo tee /etc/systemd/system/edgellm.service`)")
    p.add_argument("file", choices=list(SERVICE_FILES),
                   help="unit: edgellm.service; env: /etc/edgellm/edgellm.env, the settings it reads")

    add_index_arguments(add("index", run_index, "a local index of documents to search (docs/retrieval.md)"))
    add_serve_arguments(add("serve", run_serve, "answer requests from devices over MQTT"))
    add_ask_arguments(add("ask", run_ask, "send one prompt to an `edgellm serve` over MQTT and print the answer"))
    add_demo_arguments(add("demo", run_demo, "export SmolLM2 once, serve it on a local broker, ask it over MQTT"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except EdgeLLMError as exc:
        print(f"edgellm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"edgellm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgellm {args.command}: interrupted", file=sys.stderr)
        return 130


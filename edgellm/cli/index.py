"""`edgellm index add|search|remove|list`: the local document index from the command line."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import RetrievalError


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="index documents (Markdown, text, PDF with edgellm[retrieval]): new and "
                                         "changed ones embedded, unchanged skipped, deleted ones removed")
    add.add_argument("index", type=Path, help="the index file (SQLite; created if missing)")
    add.add_argument("paths", nargs="+", type=Path, help="files or folders to index")
    add.add_argument("--embedding", type=Path, metavar="BUNDLE",
                     help="embedding bundle (needed the first time; the index remembers it)")
    search = actions.add_parser("search", help="the chunks nearest a question, with their sources")
    search.add_argument("index", type=Path)
    search.add_argument("query")
    search.add_argument("-k", type=int, default=4, help="how many chunks (default 4)")
    search.add_argument("--embedding", type=Path, metavar="BUNDLE", help="default: the bundle the index was built with")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    remove = actions.add_parser("remove", help="drop documents (files or folders) from the index")
    remove.add_argument("index", type=Path)
    remove.add_argument("paths", nargs="+", type=Path)
    listing = actions.add_parser("list", help="the indexed documents and their chunk counts")
    listing.add_argument("index", type=Path)


def run_index(args: argparse.Namespace) -> int:
    from ..retrieval.index import Index, open_encoder, retrieve

    if args.action != "add" and not args.index.is_file():
        raise RetrievalError(f"{args.index}: no such index (create it with edgellm index add)")
    with Index(args.index) as index:
        if args.action == "add":
            model = open_encoder(index, args.embedding)
            start = time.perf_counter()
            changes = index.add(args.paths, model, report=_print_change)
            done = sum(c.action not in ("unchanged", "failed") for c in changes)
            failed = sum(c.action == "failed" for c in changes)
            print(f"{done} of {len(changes)} documents changed in {time.perf_counter() - start:.1f} s"
                  f"{f', {failed} failed' if failed else ''}; {sum(n for _, n in index.documents())} chunks in "
                  f"{args.index}", file=sys.stderr)
            return 1 if failed else 0
        elif args.action == "remove":
            for change in index.remove(args.paths):
                _print_change(change)
        elif args.action == "list":
            for path, chunks in index.documents():
                print(f"{chunks:6d}  {path}")
        else:
            hits = retrieve(index, open_encoder(index, args.embedding), args.query, args.k)
            if args.json:
                print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
            for n, hit in enumerate([] if args.json else hits, 1):
                where = f"{hit.path}:{hit.line}" + (f"  {hit.heading}" if hit.heading else "")
                print(f"[{n}] {hit.score:.3f}  {where}\n    {' '.join(hit.text.split())[:300]}")
    return 0


def _print_change(change: Any) -> None:
    if change.action == "failed":
        print(f"failed {change.error}", file=sys.stderr, flush=True)
    elif change.action != "unchanged":
        print(f"{change.action} {change.path} ({change.chunks} chunks)", flush=True)

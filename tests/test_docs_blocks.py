"""Every shell and Python block in the docs is checked against the code, so a renamed flag or a moved
file fails here rather than on a reader's board.

This is the sweep: other tests *run* particular blocks (test_cli, test_service, test_release, test_demo,
test_privacy, test_protocol); here every block is parsed. `edgellm ...` lines go through the real
argparse parser, `python script.py --flag` lines need the script and its flags, repo paths must exist,
Python blocks must compile and their edgellm imports must import. A block that cannot be checked this way
carries `<!-- docs-test: skip (why) -->` on the line above its fence. test_docs_run runs every block;
a block that is a client of a service names it in `<!-- docs-test: with (edgellm serve ...) -->`.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgellm.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "devices" / "README.md"]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*(?:\((.*?)\))?\s*-->\s*$")
WITH = re.compile(r"^\s*<!--\s*docs-test:\s*with\s*\((.*)\)\s*-->\s*$")
# Paths under these folders name files this checkout ships; anything else (bundles/, dist/, /tmp) is output.
# Not edgellm/: MQTT topics start with it (`edgellm/kitchen/request`).
REPO_DIRS = ("examples/", "devices/", "scripts/", "benchmarks/", "docs/", "tests/", ".ci/")
REPO_PATH = re.compile(r"^(?:\./)?((?:%s)[\w./-]*)" % "|".join(re.escape(d) for d in REPO_DIRS))
# Placeholders the docs use for "your value here", replaced by one the parser accepts.
PLACEHOLDERS = {"BUNDLE": "bundles/smollm2-135m", "DIR": "bundles/smollm2-135m", "BOARD": "board.local",
                "NAME": "smollm2-135m", "KEY": "key"}
SEPARATORS = {"&&", "||", "|", ";", "&"}
# `pip install '.[export,broker]'` / `'edgellm[http]'` / a wheel file with extras: each must be declared.
EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
EXTRAS_TOKEN = re.compile(r"^(?:\.|edgellm|\S*/edgellm-[^/\s]*\.whl)\[([\w,-]+)\]$")


@dataclass
class Block:
    """One fenced block: where it starts (1-based line of the fence), its language and its text."""

    doc: str
    line: int
    lang: str
    text: str
    skip: str | None  # the marker's reason; "" for a marker without one
    setup: str | None = None  # a `with` marker's command: the service this block is a client of


def blocks(markdown: str, doc: str) -> list[Block]:
    """The fenced blocks of a markdown text, dedented (list items indent theirs), with their markers."""
    lines, found, i = markdown.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, j = len(m.group(1)), m.group(2).lower(), i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(prev)
        skip = None if not marker else (marker.group(1) or "").strip()
        body = "\n".join(line[indent:] if not line[:indent].strip() else line for line in lines[i + 1:j])
        setup = WITH.match(prev)
        found.append(Block(doc, i + 1, lang, body, skip, setup[1].strip() if setup else None))
        i = j + 1
    return found


def _commands(text: str, console: bool) -> list[tuple[int, list[str]]]:
    """(line offset, argv) of each simple command: continuations joined, comments dropped, split on
    `&&`, `;`, `|`. A console block's commands are its `$ ` lines; the rest is output."""
    logical, start, pending = [], 0, ""
    for n, line in enumerate(text.splitlines()):
        if console:
            if not line.startswith("$ ") and not pending:
                continue
            line = line[2:] if line.startswith("$ ") and not pending else line
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append((start, pending + line))
        pending = ""
    commands = []
    for n, line in logical:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in list(lexer) + [";"]:
            if token in SEPARATORS:
                if argv:
                    commands.append((n, argv))
                argv = []
            else:
                argv.append(token)
    return commands


def _substitute(token: str) -> str:
    token = re.sub(r"\$\{?(\w+)\}?", lambda m: PLACEHOLDERS.get(m.group(1), "value"), token)
    return PLACEHOLDERS.get(token, token)


def _parse_edgellm(argv: list[str]) -> str | None:
    """None when the real parser accepts argv, else its complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    return None


def _script_flags(script: Path, argv: list[str]) -> list[str]:
    """Flags given to a repo script that its source never declares (scripts declare them literally)."""
    source = script.read_text()
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    return [f for f in flags if f'"{f}"' not in source and f"'{f}'" not in source]


def shell_problems(block: Block) -> list[str]:
    """Everything wrong with a shell block, each naming its doc line and command."""
    problems = []
    try:
        commands = _commands(block.text, block.lang == "console")
    except ValueError as exc:  # unbalanced quotes: nothing below could be trusted
        return [f"{block.doc}:{block.line}: cannot tokenize ({exc}); fix it or mark it"]
    for offset, argv in commands:
        where = f"{block.doc}:{block.line + 1 + offset}: `{shlex.join(argv)}`"
        argv = [_substitute(a) for a in argv]
        while argv and (argv[0] == "sudo" or re.match(r"^\w+=", argv[0])):
            argv = argv[1:]
        if not argv:
            continue
        for token in argv:
            m = REPO_PATH.match(token)
            if m and not (ROOT / m.group(1).rstrip(".")).exists():
                problems.append(f"{where}: no {m.group(1)} in the repo")
            m = EXTRAS_TOKEN.match(token)
            unknown = sorted(set(m.group(1).split(",")) - EXTRAS) if m else []
            if unknown:
                problems.append(f"{where}: pyproject.toml declares no extra {', '.join(unknown)}")
        program = Path(argv[0]).name
        if program == "edgellm":
            complaint = _parse_edgellm(argv[1:])
            if complaint:
                problems.append(f"{where}: {complaint}")
        elif re.fullmatch(r"python[\d.]*", program) and len(argv) > 1 and argv[1].endswith(".py"):
            script = ROOT / argv[1]
            if not script.is_file():
                problems.append(f"{where}: no script {argv[1]}")
            else:
                problems += [f"{where}: {argv[1]} declares no {flag}" for flag in _script_flags(script, argv[2:])]
    return problems


def python_problems(block: Block) -> list[str]:
    """A Python block must compile, and what it imports from this project must import."""
    where = f"{block.doc}:{block.line}"
    try:
        tree = compile(block.text, where, "exec", ast.PyCF_ONLY_AST)
    except SyntaxError as exc:
        return [f"{where}: does not compile: {exc}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            wanted = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            wanted = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in wanted:
            if module.split(".")[0] not in ("edgellm", "export"):
                continue
            try:
                mod = importlib.import_module(module)
                if name and name != "*" and not hasattr(mod, name):
                    importlib.import_module(f"{module}.{name}")
            except ImportError as exc:
                problems.append(f"{where}: line {node.lineno}: {exc}")
    return problems


def untyped_problems(block: Block) -> list[str]:
    """An untagged fence that holds commands escapes the sweep: it must say it is shell."""
    if any(re.match(r"^(edgellm|python3?|sudo) ", line) for line in block.text.splitlines()):
        return [f"{block.doc}:{block.line}: untagged block holds commands; tag it ```sh (or mark it)"]
    return []


def problems(block: Block) -> list[str]:
    if block.skip is not None:
        return [] if block.skip else [f"{block.doc}:{block.line}: docs-test marker gives no reason"]
    # a `with` marker's service command (on the line above the fence) is checked like a shell line
    found = shell_problems(Block(block.doc, block.line - 2, "sh", block.setup, None)) if block.setup else []
    if block.lang in SHELL:
        return found + shell_problems(block)
    if block.lang == "python":
        return found + python_problems(block)
    if block.lang == "":
        return found + untyped_problems(block)
    return found  # json, toml: data, checked where their parsers live (test_protocol, test_devices)


ALL = [b for doc in DOC_FILES for b in blocks(doc.read_text(), str(doc.relative_to(ROOT)))]


@pytest.mark.parametrize("block", ALL, ids=[f"{b.doc}:{b.line}" for b in ALL])
def test_doc_block(block: Block) -> None:
    found = problems(block)
    assert not found, "\n".join(found)


def test_the_sweep_covers_the_docs() -> None:
    """The sweep sees the blocks it claims to: if fences stop matching, this notices before the
    parametrized test silently shrinks. The parser knows `export`'s flags only when export.cli imports:
    say that here rather than as "unrecognized arguments" on every export line."""
    importlib.import_module("edgellm.export.cli")
    langs = [b.lang for b in ALL]
    assert sum(lang in SHELL for lang in langs) >= 10 and langs.count("python") >= 4
    commands = [argv for b in ALL if b.lang in SHELL for _, argv in _commands(b.text, b.lang == "console")]
    assert sum(Path(a[0]).name == "edgellm" for a in commands) >= 15


def test_a_misspelled_flag_is_reported_with_its_place() -> None:
    doc = ("# T\n\ntext\n\n```sh\nedgellm serve B --http :8080 \\\n  --broker embedded\n"
           "edgellm serve B --htpp :8080\n```\n")
    (block,) = blocks(doc, "T.md")
    found = problems(block)
    assert len(found) == 1 and found[0].startswith("T.md:8:") and "--htpp" in found[0], found


def test_stale_paths_scripts_and_imports_are_reported() -> None:
    doc = ("```bash\nedgellm run B 'hi' --tools examples/nope.json  # x\npip install -e '.[export,brokr]'\n"
           "python scripts/simulate_sensors.py --brokr mqtt://h && python scripts/gone.py\n```\n"
           "```python\nfrom edgellm.nope import x\nimport edgellm\n```\n"
           "```python\nprint(1\n```\n")
    shell, imports, broken = blocks(doc, "T.md")
    found = "\n".join(problems(shell))
    assert "examples/nope.json" in found and "--brokr" in found and "scripts/gone.py" in found, found
    assert "no extra brokr" in found and "export" not in found.split("no extra", 1)[1], found
    assert "edgellm.nope" in "\n".join(problems(imports)) and "does not compile" in problems(broken)[0]


def test_markers_need_a_reason_and_untyped_commands_are_caught() -> None:
    doc = ("<!-- docs-test: skip -->\n```sh\nedgellm nope\n```\n"
           "<!-- docs-test: skip (needs a Pi) -->\n```sh\nedgellm nope\n```\n"
           "```\nedgellm serve B\n```\n")
    bare, reasoned, untyped = blocks(doc, "T.md")
    assert "no reason" in problems(bare)[0] and problems(reasoned) == [] and "untagged" in problems(untyped)[0]


def test_a_with_markers_service_command_is_parsed_too() -> None:
    doc = "<!-- docs-test: with (edgellm serve B --htpp :8080) -->\n```python\nimport edgellm\n```\n"
    (block,) = blocks(doc, "T.md")
    assert block.setup == "edgellm serve B --htpp :8080" and "--htpp" in "\n".join(problems(block))

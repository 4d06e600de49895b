"""Every shell and Python block of README.md, docs/*.md and devices/README.md runs here as a reader runs
it, and where the docs show a result, the result is checked.

The reader's checkout is a sandbox folder of links to this one, with `bundles/smollm2-135m` (what
`edgellm demo` leaves behind: the session's SmolLM2 export, made with the same defaults) and `.venv`
(this interpreter's venv, which CI installed as the README says). Each logical line of a shell block
runs in bash in order; what a reader starts in another terminal (`edgellm serve`, `mosquitto_sub`)
runs in the background until the block ends, and the next line waits until a service is up. Lines
name hosts a test cannot reach, so a few words are rewritten and nothing else: `broker.local`,
`hub` and port 1883 become the test's mosquitto (or the embedded broker a `serve` line announced),
HTTP ports become free ones, `/etc/edgellm/` a folder of the sandbox. `pip install` is not run (CI
has no index): it checks that what the line installs is installed here, extras included. Blocks that
cannot run here (on a board, as root) carry `<!-- docs-test: skip (why) -->`; a block that is a
client of a service names the service in `<!-- docs-test: with (edgellm serve ...) -->`.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from test_docs_blocks import ALL, PLACEHOLDERS, SHELL, Block

ROOT = Path(__file__).resolve().parent.parent
RUN = [b for b in ALL if b.lang in SHELL | {"python"}]
# Documented exports that a session fixture already made the same way: the line links the fixture.
PROVIDED = {"edgellm export all-minilm-l6-v2 -o bundles/minilm --quant int8": ("minilm", "int8")}
# What a line's (or a Python block's) output must show: (doc, a piece of the line) -> pattern.
EXPECT = {
    ("README.md", "edgellm demo"): r"Paris",
    ("README.md", "edgellm info"): r"sha256 verified \(4/4\)",
    ("README.md", '"Name three metals." --system'): r"\[(stop|length)\] prompt \d+ tok",
    ("README.md", "edgellm chat"): r"history cleared",
    ("README.md", "edgellm ask"): r"\[(stop|length)\]",
    ("README.md", "edgellm devices"): r"execution providers and devices on this machine:\n\s+CPUExecutionProvider",
    # only the declared parameters, in the order declared (the grammar closes the object)
    ("README.md", "--tools examples/tools.json"): r'"name": "set_valve", "arguments": "\{\\"valve\\": \d, \\"open\\": (true|false)\}"',
    ("README.md", "--json-schema examples/report.json"): r'"severity": "(low|medium|high)"',
    ("README.md", 'profile="rpi5"'): r"(stop|length) Usage\(prompt_tokens=\d+",
    ("README.md", 'open("examples/report.json")'):
        r"^\{'severity': '(low|medium|high)', 'action': .*\}\ntool_calls .*'arguments': '\{\"valve\": \d, \"open\": (true|false)\}'",
    ("docs/anomaly.md", "-t 'factory/+/+/explanation'"): r'/explanation \{.*"citations":\[\{"id":"M\d","path":"\S+line-a-maintenance\.md"',
    ("docs/anomaly.md", "mosquitto_sub"): r"factory/\S+/explanation \{",
    ("docs/http.md", "from openai import OpenAI"): r"\w",
    ("docs/mqtt.md", "edgellm ask"): r"\[(stop|length)\]",
    ("docs/mqtt.md", "mosquitto_sub"): r'^edgellm/kitchen/response/1 \{.*"done": ?true',
    ("docs/mqtt.md", "import json, uuid"): r"\n (stop|length)\n",
    ("docs/retrieval.md", "encoder.embed"): r"^$",
    ("docs/retrieval.md", "index search"): r"docs/\S+\.md:\d+",
    ("docs/retrieval.md", "index list"): r"docs/anomaly\.md",
    ("docs/retrieval.md", "retrieve(index"): r"^\d\.\d\d \S*docs/\S+\.md:\d+ ",  # the index keeps absolute paths
    ("docs/retrieval.md", "--index manuals.sqlite --sources 2"): r"^sources:\n\[1\][ *] \S*docs/\S+\.md:\d+",
    ("docs/retrieval.md", '"retrieval": {"index": "manuals"'): r'"citations": ?\[\{"n": ?1, ?"chunk": ?\d+, ?"path": ?"\S+\.md"',
}
# A two-minute simulation is cut to what the first explanations need (faults start after 10 s).
SHORTER = {"--duration 120": "--duration 30"}
WATCH_S = 90  # how long a watching terminal may take to show its result after the block's last line
STDIN = {"edgellm chat": "Name three metals.\n/reset\n"}  # then end of input, which ends the chat
BACKGROUND = re.compile(r"^(edgellm serve|mosquitto_sub)\b")
LINE_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reader:
    """The reader's shell: where commands run, the broker they reach, the services they started."""

    root: Path
    broker_port: int
    http_ports: dict[str, int] = field(default_factory=dict)
    background: list[tuple[str, subprocess.Popen, Path]] = field(default_factory=list)

    def rewrite(self, text: str, broker_port: int) -> str:
        """The few words a test must change: hosts it cannot reach, ports it must not take."""
        text = text.replace("/etc/edgellm/", f"{self.root}/etc/edgellm/")
        for long, short in SHORTER.items():
            text = text.replace(long, short)
        text = re.sub(r"\b(%s)\b" % "|".join(PLACEHOLDERS), lambda m: PLACEHOLDERS[m[1]], text)
        text = re.sub(r"mqtt://([\w.-]+\.local|127\.0\.0\.1|hub)(:1883)?\b", f"mqtt://127.0.0.1:{broker_port}", text)
        text = re.sub(r"-h ([\w.-]+\.local|127\.0\.0\.1)\b", f"-h 127.0.0.1 -p {broker_port}", text)
        text = text.replace('"broker.local", 1883', f'"127.0.0.1", {broker_port}')
        return re.sub(r"(--http |http://)(?:0\.0\.0\.0|127\.0\.0\.1)?:(\d+)",
                      lambda m: f"{m[1]}127.0.0.1:{self.http_ports.setdefault(m[2], _free_port())}", text)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "PYTHONPATH": str(Path(__file__).parent), "PIP_CHECK": sys.executable}

    def start(self, line: str, log: Path) -> None:
        """Run a reader's other terminal; a service must be up before the next line runs."""
        if line.startswith("edgellm serve"):
            self.stop("edgellm serve")  # a second serve in a block is an alternative to the first
        proc = subprocess.Popen(["bash", "-c", PRELUDE + "exec " + line], cwd=self.root, env=self.env(),
                                stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.background.append((line, proc, log))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"`{line}` exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            if not line.startswith("edgellm serve") or _serving(line, log.read_text()):
                time.sleep(0.5)  # a subscriber's SUBSCRIBE, a service's first status
                return
            time.sleep(0.2)
        raise AssertionError(f"`{line}` not up in 120 s:\n{log.read_text()[-3000:]}")

    def stop(self, prefix: str = "") -> None:
        for entry in [e for e in self.background if e[0].startswith(prefix)]:
            _, proc, _ = entry
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            self.background.remove(entry)


def _serving(line: str, log: str) -> bool:
    """Up: connected to its broker, and answering /health where it serves HTTP."""
    if "--http" not in line or "--broker" in line:
        if not re.search(r"connected to mqtt://", log):
            return False
    m = re.search(r"over HTTP at (http://\S+)", log)
    if "--http" in line:
        try:
            return bool(m) and urllib.request.urlopen(f"{m[1]}/health", timeout=2).status == 200
        except OSError:
            return False
    return True


# Bash for every line: `pip install` checks instead of installing, `python3 -m venv` keeps the venv.
PRELUDE = """
pip() { "$PIP_CHECK" -c 'import sys; from test_docs_run import pip_check; sys.exit(pip_check(sys.argv[1:]))' "$@"; }
python3() { if [ "$1 $2" = "-m venv" ]; then return 0; fi; command python3 "$@"; }
"""


def _satisfied(requirement: str, seen: set[str]) -> list[str]:
    """What of one requirement (extras followed, edgellm's own too) this environment lacks."""
    req = Requirement(requirement)
    if req.marker and not req.marker.evaluate():
        return []
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return [requirement]
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        return [f"{requirement} ({version} installed)"]
    missing = []
    for extra in sorted(req.extras - seen):
        seen.add(extra)
        for dep in metadata.requires(req.name) or []:
            dep_req = Requirement(dep)
            if dep_req.marker and dep_req.marker.evaluate({"extra": extra}) and not dep_req.marker.evaluate({"extra": ""}):
                dep_req.marker = None
                missing += _satisfied(str(dep_req), seen)
    return missing


def pip_check(argv: list[str]) -> int:
    """`pip install ...` as documented, checked against this environment (CI has no index)."""
    if argv[:1] != ["install"]:
        print(f"docs test: `pip {' '.join(argv)}` is not run here", file=sys.stderr)
        return 2
    specs = [a for a in argv[1:] if not a.startswith("-")]
    missing = []
    for spec in specs:
        spec = re.sub(r"^(\.|\S*/edgellm-[^/\s]*\.whl)(?=\[|$)", "edgellm", spec)
        missing += _satisfied(spec, set())
    for line in missing:
        print(f"docs test: not installed: {line}", file=sys.stderr)
    return 1 if missing else 0


def _logical_lines(text: str) -> list[str]:
    lines, pending = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _expected(block: Block, piece_of: str) -> str | None:
    piece_of = re.sub(r"\s#\s.*", "", piece_of)  # a line's comment names other commands
    return next((pat for (doc, piece), pat in EXPECT.items() if doc == block.doc and piece in piece_of), None)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, smollm2_bundle) -> Path:
    root = tmp_path_factory.mktemp("reader")
    for entry in ROOT.iterdir():
        if entry.name not in (".venv", "bundles", ".git", "dist", "build"):
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(sys.prefix)
    (root / "bundles").mkdir()
    (root / "bundles" / "smollm2-135m").symlink_to(smollm2_bundle)
    (root / "etc" / "edgellm").mkdir(parents=True)
    (root / "etc" / "edgellm" / "keys").write_text("key\n")
    return root


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory):
    from mqtt_helpers import start_broker

    broker = start_broker(tmp_path_factory.mktemp("docs-broker"))
    yield broker
    broker.close()


@pytest.fixture(scope="module")
def http_ports() -> dict[str, int]:
    """A free port for each port the docs name, the same in every block (a client finds its server)."""
    return {}


@pytest.mark.slow  # the session's SmolLM2 export
@pytest.mark.mqtt
@pytest.mark.parametrize("block", [  # skipped before the fixtures: a board-only block costs no export
    pytest.param(b, id=f"{b.doc}:{b.line}", marks=[pytest.mark.skip(reason=b.skip)] if b.skip else []) for b in RUN])
def test_the_block_runs_as_written(block: Block, sandbox: Path, mosquitto, http_ports: dict[str, int], request,
                                   tmp_path: Path) -> None:
    if "bundles/minilm" in block.text and not (sandbox / "bundles" / "minilm").exists():
        (sandbox / "bundles" / "minilm").symlink_to(request.getfixturevalue("minilm")["int8"])
    reader = Reader(sandbox, int(mosquitto.url.rsplit(":", 1)[1]), http_ports)
    broker_port = reader.broker_port
    try:
        if block.setup:
            reader.start(reader.rewrite(block.setup, broker_port), tmp_path / "setup.log")
        if block.lang == "python":
            script = tmp_path / "block.py"
            script.write_text(reader.rewrite(block.text, broker_port))
            _check(block, block.text, _run(reader, f"python {script}", tmp_path))
            return
        for n, line in enumerate(_logical_lines(block.text)):
            if line in PROVIDED:  # the session made this bundle the same way (see PROVIDED)
                continue
            line = reader.rewrite(line, broker_port)
            if BACKGROUND.match(line):
                log = tmp_path / f"bg{n}.log"
                reader.start(line, log)
                m = re.search(r"broker: \w+ mqtt://127\.0\.0\.1:(\d+)", log.read_text())
                if m and "--broker" not in line:  # the embedded broker it started: terminals 2, 3 use it
                    broker_port = int(m[1])
                continue
            _check(block, line, _run(reader, line, tmp_path, STDIN.get(next((k for k in STDIN if k in line), ""))))
        for line, _, log in reader.background:  # what a watching terminal shows, given time to arrive
            if line.startswith("mosquitto_sub"):
                _check(block, line, log, wait_s=WATCH_S)
    finally:
        reader.stop()


def _run(reader: Reader, line: str, tmp_path: Path, stdin: str | None = None) -> str:
    res = subprocess.run(["bash", "-c", PRELUDE + line], cwd=reader.root, env=reader.env(), input=stdin or "",
                         capture_output=True, text=True, timeout=LINE_TIMEOUT_S)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"`{line}` exited {res.returncode}:\n{out[-3000:]}"
    return out


def _check(block: Block, line: str, out: str | Path, wait_s: float = 0) -> None:
    """The documented result in a line's output (or, for a watching terminal, its log within wait_s)."""
    pattern = _expected(block, line)
    if pattern is None:
        return
    deadline = time.monotonic() + wait_s
    while True:
        text = out.read_text() if isinstance(out, Path) else out
        if re.search(pattern, text, re.M) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    assert re.search(pattern, text, re.M), f"{block.doc}:{block.line}: `{line[:80]}` shows no {pattern!r}:\n{text[-3000:]}"


def test_a_documented_install_is_checked_not_trusted() -> None:
    """`pip install` lines pass only when what they name is installed here, extras followed."""
    assert pip_check(["install", "-e", ".[export,broker]"]) == 0
    assert pip_check(["install", "--no-deps", "edgellm-no-such-package"]) == 1
    assert pip_check(["wheel", "."]) == 2

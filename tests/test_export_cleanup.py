"""A terminated or killed export leaves no hidden directories behind for good.

SIGTERM takes Ctrl-C's path (Python removes everything on the way out); SIGKILL runs nothing, so
the next export into the same directory removes what a dead export left, and only that.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.runtime.ownership import start_time
from edgellm.export.api import export_model
from edgellm.export.config import QuantConfig
from edgellm.export.scratch import terminate_cleans_up

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).parent.parent

# An int4 export (int8 KV: calibration too) held inside its quality gate's reference build,
# when the bundle being written and the fp32 reference both exist beside the output.
_HELD = """
import sys, time
import edgellm.export.api as api

perplexity, calls = api.perplexity, []

def held(*args, **kw):
    calls.append(1)
    if len(calls) == 2:
        print("held", flush=True)
        time.sleep(60)
    return perplexity(*args, **kw)

api.perplexity = held
api.export_model(sys.argv[1], sys.argv[2], quant=api.QuantConfig(weights="int4"))
"""


def _held_export(source: Path, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HELD, str(source), str(out)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    if line != "held\n":
        proc.kill()
        raise AssertionError(f"export did not reach its quality gate: {proc.communicate()[1][-2000:]}")
    return proc


def _debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def _marked(path: Path, pid: int, start: str | None) -> Path:
    path.mkdir()
    (path / "model.onnx").write_bytes(b"\0" * 1024)
    path.with_name(path.name + ".owner").write_text(
        json.dumps({"host": socket.gethostname(), "pid": pid, "start": start}))
    return path


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_sigterm_mid_export_leaves_nothing_beside_the_output(tmp_path, tiny_hf):
    parent = tmp_path / "out"
    proc = _held_export(tiny_hf(), parent / "bundle")
    try:
        held = _debris(parent)
        assert any(n.startswith(".bundle.") and n.endswith(".tmp") for n in held), held
        assert any(n.startswith(".reference.") for n in held), held
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.communicate()
    assert _debris(parent) == []


def test_a_killed_exports_leftovers_are_removed_by_the_next_export(tmp_path, tiny_hf):
    parent = tmp_path / "out"
    proc = _held_export(tiny_hf(), parent / "bundle")
    proc.kill()
    proc.communicate()
    left = _debris(parent)
    assert len(left) == 4 and sum(n.endswith(".owner") for n in left) == 2, left  # .tmp, .reference, markers
    export_model(tiny_hf(), parent / "again", evaluate=False)
    assert _debris(parent) == ["again"]


def test_only_directories_of_dead_exports_with_our_names_are_removed(tmp_path, tiny_hf):
    parent = tmp_path / "out"
    parent.mkdir()
    dead = _dead_pid()
    stale = [_marked(parent / ".bundle.k3j2h1g0.tmp", dead, None), _marked(parent / ".reference.x1y2z3", dead, None),
             _marked(parent / ".calibrate.a1b2c3", dead, None)]
    live = subprocess.Popen(["sleep", "60"])  # a concurrent export, still writing
    try:
        kept = [_marked(parent / ".other.q9w8e7r6.tmp", live.pid, start_time(live.pid)),
                _marked(parent / ".cache", dead, None)]  # a dead owner, but not a name an export uses
        (parent / ".reference.unmarked").mkdir()  # no marker: nothing proves it ours
        export_model(tiny_hf(), parent / "bundle", evaluate=False)
        assert live.poll() is None
    finally:
        live.kill()
        live.wait()
    assert not any(p.exists() or p.with_name(p.name + ".owner").exists() for p in stale)
    assert all(p.is_dir() and p.with_name(p.name + ".owner").is_file() for p in kept)
    assert _debris(parent) == sorted([".cache", ".cache.owner", ".other.q9w8e7r6.tmp", ".other.q9w8e7r6.tmp.owner",
                                      ".reference.unmarked", "bundle"])


def test_a_reused_pid_does_not_keep_a_dead_exports_directory(tmp_path, tiny_hf):
    parent = tmp_path / "out"
    parent.mkdir()
    live = subprocess.Popen(["sleep", "60"])
    try:
        if start_time(live.pid) is None:
            pytest.skip("no /proc: process start times are unknown here")
        # The pid runs, but it started later than the export that wrote the marker.
        stale = _marked(parent / ".bundle.r3u5e6d7.tmp", live.pid, "1")
        export_model(tiny_hf(), parent / "bundle", evaluate=False)
    finally:
        live.kill()
        live.wait()
    assert not stale.exists()


def test_sigterm_is_left_to_an_application_that_handles_it():
    def mine(*_a) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with terminate_cleans_up():
            assert signal.getsignal(signal.SIGTERM) is mine
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with terminate_cleans_up():
            assert signal.getsignal(signal.SIGTERM) not in (mine, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)

"""`edgellm run / chat / info / devices` as a user runs them: real processes, real bundles."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgellm


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("command", ["export", "run", "chat", "info", "devices", "serve", "ask"])
def test_every_command_explains_itself(command):
    res = _cli(command, "--help")
    assert res.returncode == 0 and "usage: edgellm " + command in res.stdout


def test_run_streams_the_answer_and_prints_stats(tiny_bundle):
    res = _cli("run", str(tiny_bundle), "--raw", "The quick brown", "-n", "12")
    assert res.returncode == 0, res.stderr
    expected = edgellm.load(tiny_bundle).generate("The quick brown", max_new_tokens=12)
    assert res.stdout == expected.text + "\n"
    stats = res.stderr.strip().splitlines()[-1]
    assert re.match(r"\[(stop|length)\] prompt \d+ tok \(0 cached\), completion \d+ tok, ttft \d+ ms, [\d.]+ tok/s",
                    stats), stats


def test_the_readmes_run_commands_find_the_files_they_name(tiny_bundle):
    """README's `--tools` / `--json-schema` lines run as written from a checkout (the files ship in
    examples/), on the tiny bundle instead of SmolLM2 and with a small budget."""
    pytest.importorskip("llguidance")
    root = Path(__file__).parent.parent
    lines = [line.split("#")[0] for line in (root / "README.md").read_text().splitlines()
             if line.startswith("edgellm run ") and ("--tools" in line or "--json-schema" in line)]
    assert len(lines) == 2, lines
    for line in lines:
        args = shlex.split(line)[2:]
        args[0] = str(tiny_bundle)
        res = subprocess.run([sys.executable, "-m", "edgellm.cli", "run", *args, "-n", "24"], cwd=root,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (line, res.stderr)


def test_run_sampling_is_reproducible_under_a_seed(tiny_bundle):
    args = ("run", str(tiny_bundle), "Hello", "-n", "16", "--temperature", "1.0", "--top-p", "0.9", "--seed", "7")
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0 and first.stdout == second.stdout


def test_chat_keeps_history_and_reuses_the_cache(tiny_bundle):
    res = _cli("chat", str(tiny_bundle), "-n", "6", stdin="Hello there\nAnd again\n\n")
    assert res.returncode == 0, res.stderr
    stats = [line for line in res.stderr.splitlines() if line.startswith("[")]
    assert len(stats) == 2
    cached = int(re.search(r"\((\d+) cached\)", stats[1]).group(1))
    assert cached > 0, stats  # the second turn prefills only what is new


def test_chat_says_reset_cleared_the_history(tiny_bundle):
    res = _cli("chat", str(tiny_bundle), "-n", "2", "--system", "Be brief.", stdin="Hello\n/reset\n\n")
    assert res.returncode == 0, res.stderr
    assert "[history cleared; the system prompt stays]" in res.stderr.splitlines(), res.stderr


def test_ask_help_shows_no_serve_only_words():
    ask = _cli("ask", "--help").stdout
    assert "embedded" not in ask and "for serve" not in ask, ask
    assert "3.1.1 when the broker refuses 5" in ask


def test_info_summarises_and_verifies(tiny_bundle):
    res = _cli("info", str(tiny_bundle))
    assert res.returncode == 0, res.stderr
    assert "llama: 2 layers" in res.stdout and re.search(r"sha256 verified \((\d+)/\1\)", res.stdout)
    data = json.loads(_cli("info", str(tiny_bundle), "--json").stdout)
    assert data["graph"]["kind"] == "fast" and "model.onnx" in data["files"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("run", "{missing}", "hi"), "not a bundle directory"),
        (("run", "{corrupt}", "hi"), "checksum mismatch"),
        (("run", "{bundle}", "hi", "--temperature", "-1"), "temperature"),
        (("info", "{corrupt}"), "checksum mismatch"),
        (("devices", "no-such-board"), "no-such-board"),
    ],
    ids=["missing-bundle", "corrupt-bundle", "bad-temperature", "info-corrupt", "unknown-profile"],
)
def test_errors_are_one_line_and_non_zero(tiny_bundle, tmp_path, args, message):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle, corrupt)
    data = bytearray((corrupt / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "model.onnx").write_bytes(bytes(data))
    paths = {"missing": str(tmp_path / "nope"), "corrupt": str(corrupt), "bundle": str(tiny_bundle)}
    res = _cli(*(a.format(**paths) for a in args))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_service_commands_do_not_import_the_cli():
    res = _python("import sys, edgellm.cli.commands; print('edgellm.cli.main' in sys.modules)")
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_a_broken_service_import_fails_loudly_instead_of_hiding_serve():
    # None in sys.modules makes the import of that module raise ImportError.
    res = _python("import sys; sys.modules['edgellm.service.server'] = None\n"
                  "from edgellm.cli.main import main; main(['--help'])")
    assert res.returncode != 0 and "import of edgellm.service.server halted" in res.stderr, res.stderr
    assert "serve" not in res.stdout  # no --help printed without the service commands


def test_sampling_flags_come_from_the_parameter_declaration():
    res = _cli("run", "--help")
    assert "--penalty-window" in res.stdout and "-n MAX_NEW_TOKENS, --max-tokens" in res.stdout
    assert "in [0, 1)" in res.stdout  # min_p's range, as params.py declares it
    res = _cli("run", "bundle-is-not-read", "hi", "--min-p", "1")
    assert res.returncode == 1 and res.stderr.strip() == "edgellm run: error: --min-p must be a number in [0, 1), got 1.0"


def test_ask_prints_a_restarted_answer_on_its_own_line(capsys) -> None:
    """A service killed mid-answer answers again from seq 0 flagged `restart`: `ask` ends the
    partial line and says so on stderr instead of running the two answers together."""
    from edgellm.cli.commands import _print_replies

    replies = [{"id": "q", "seq": 0, "delta": "The capi"},
               {"id": "q", "seq": 0, "delta": "The capital", "restart": True},
               {"id": "q", "seq": 1, "delta": " is Paris."},
               {"id": "q", "done": True, "finish_reason": "stop", "usage": {}}]
    assert _print_replies("ask", replies) == 0
    out, err = capsys.readouterr()
    assert out == "The capi\nThe capital is Paris.\n"
    assert "[the service restarted; its answer starts over]" in err

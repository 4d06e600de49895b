"""The release path a board follows (devices/README.md): build the wheel once, install it with no
checkout, and get the systemd unit and its settings file from the installed package."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICES_README = ROOT / "devices" / "README.md"
VENV_BIN = "/opt/edgellm/venv/bin/"  # where devices/README.md installs the wheel on a board


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel as devices/README.md builds it (without build isolation: CI has no index)."""
    out = tmp_path_factory.mktemp("dist")
    line = next(line for line in DEVICES_README.read_text().splitlines() if "pip wheel" in line)
    args = shlex.split(line.split("#")[0])
    assert args[:3] == ["pip", "wheel", "."] and "--no-deps" in args, line
    args[args.index("-w") + 1] = str(out)
    res = subprocess.run([sys.executable, "-m", *args, "--no-build-isolation", "-q"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (whl,) = out.glob("edgellm-*-py3-none-any.whl")
    return whl


def test_the_wheel_carries_the_unit_its_settings_and_the_profiles(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("edgellm.service", "edgellm.env", "rpi4.toml"):
        assert f"edgellm/profiles/{name}" in names


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; the dependencies come from this interpreter's
    site-packages (no network), seen through a folder of links that leaves out edgellm's own
    editable install, so `import edgellm` and pip can only find the wheel's copy."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    deps = env_dir / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("edgellm", "__editable__", "_edgellm")):
            (deps / entry.name).symlink_to(entry)
    return env_dir


def _env(env_dir: Path) -> dict[str, str]:
    return {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "PYTHONPATH": str(env_dir / "deps")}


def _in_venv(env_dir: Path, command: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=tmp_path, env=_env(env_dir), capture_output=True, text=True,
                          timeout=120)


def test_the_installed_wheel_is_not_the_checkout(installed, tmp_path):
    res = _in_venv(installed, "python -c 'import edgellm; print(edgellm.__file__)'", tmp_path)
    assert res.stdout.startswith(str(installed)), res.stdout + res.stderr


@pytest.mark.parametrize("file, shipped", [("unit", "edgellm.service"), ("env", "edgellm.env")])
def test_the_readmes_service_lines_write_the_shipped_files(installed, tmp_path, file, shipped):
    """devices/README.md's `edgellm service ... | sudo tee PATH` lines, run in the wheel's venv
    with the path moved under tmp_path (and no sudo): the file written is the shipped one."""
    lines = [line.strip() for line in DEVICES_README.read_text().splitlines()
             if re.match(rf"\s*{VENV_BIN}edgellm service {file} \| sudo tee ", line)]
    assert len(lines) == 1, lines
    target = lines[0].split()[-1]
    command = lines[0].replace(VENV_BIN, f"{installed}/bin/").replace("sudo tee", "tee")
    res = _in_venv(installed, command.replace(target, f"./{Path(target).name}"), tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / Path(target).name).read_text() == (ROOT / "devices" / shipped).read_text()


def test_the_unit_reads_the_settings_file_the_env_command_writes():
    unit = (ROOT / "devices" / "edgellm.service").read_text()
    env = (ROOT / "devices" / "edgellm.env").read_text()
    path = re.search(r"^EnvironmentFile=(\S+)$", unit, re.M)[1]
    assert f"edgellm service env | sudo tee {path}" in DEVICES_README.read_text()
    for name in re.findall(r"\$\{?(EDGELLM_\w+)", unit):
        assert re.search(rf"^{name}=", env, re.M), name


def _install_hints() -> list[tuple[Path, str]]:
    """Every `pip install ...` the runtime tells a user (strings in edgellm/*.py)."""
    return [(path, hint) for path in sorted((ROOT / "edgellm").rglob("*.py"))
            for hint in re.findall(r"pip install [^`\n]*", path.read_text())]


def test_the_runtimes_install_hints_need_no_checkout():
    """A hint names `edgellm[extra]`, which pip resolves to the installed edgellm (wheel or checkout);
    `-e ".[x]"` works only inside a checkout, which a board installed from the wheel has not."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    hints = _install_hints()
    assert len(hints) >= 4, hints
    for path, hint in hints:
        assert " -e " not in hint and '".[' not in hint and "'.[" not in hint, f"{path.name}: {hint}"
        for extra in re.findall(r"edgellm\[(\w+)\]", hint):
            assert extra in extras, f"{path.name}: {hint}"


def test_an_extra_named_by_a_hint_resolves_to_the_installed_wheel(installed):
    """`pip install "edgellm[http]"` in the wheel's venv finds edgellm there (no index: it is on no
    index), so the hints mean what devices/README.md says."""
    named = sorted({e for _, hint in _install_hints() for e in re.findall(r"edgellm\[(\w+)\]", hint)})
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(installed / "bin" / "python"), "install",
                          "--dry-run", "--no-index", f"edgellm[{','.join(named)}]"],
                         env=_env(installed), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(rf"Requirement already satisfied: edgellm\[[\w,]+\] in {re.escape(str(installed))}", res.stdout)


def test_the_lean_install_lists_the_runtime_dependencies_but_tokenizers_own():
    """devices/README.md's install without huggingface_hub: tokenizers --no-deps, then every other
    runtime dependency of pyproject.toml by name (a new dependency must join that line)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[\w-]+", d)[0].lower() for d in deps}
    lines = DEVICES_README.read_text().splitlines()
    no_deps = next(line for line in lines if "pip install --no-deps '/tmp/edgellm-" in line)
    assert no_deps.split()[-1] == "tokenizers"
    rest = next(line for line in lines if re.match(rf"\s*sudo {VENV_BIN}pip install onnxruntime ", line))
    assert set(rest.split()[3:]) == names - {"tokenizers"}


def test_the_runtime_runs_without_hugging_faces_download_client(tiny_bundle):
    """What the lean install leaves out is never imported: `edgellm run` answers with
    huggingface_hub and hf_xet unimportable."""
    code = ("import sys; sys.modules.update(huggingface_hub=None, hf_xet=None); from edgellm.cli.main import main; "
            f"sys.exit(main(['run', {str(tiny_bundle)!r}, 'hello', '--max-tokens', '4']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "completion" in res.stderr, res.stderr


def test_the_docs_install_line_takes_the_wheel_with_extras(wheel, installed, tmp_path):
    """devices/README.md's `pip install '/tmp/edgellm-VERSION-py3-none-any.whl[http,grammar]'` into a
    venv without edgellm, with the file this checkout builds (its name is the one both READMEs give),
    resolved without an index (the dependencies are the ones `installed` links in)."""
    for readme in (DEVICES_README, ROOT / "README.md"):
        assert wheel.name in readme.read_text(), readme
    line = next(line for line in DEVICES_README.read_text().splitlines()
                if re.match(rf"\s*sudo {VENV_BIN}pip install '/tmp/edgellm-[^']*\[", line))
    (spec,) = shlex.split(line)[3:]
    spec = spec.replace(f"/tmp/{wheel.name}", str(wheel))
    venv.create(tmp_path / "v", with_pip=False)
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(tmp_path / "v" / "bin" / "python"), "install",
                          "--dry-run", "--no-index", spec], env=_env(installed), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "Would install edgellm-" in res.stdout, res.stdout + res.stderr


def test_the_wheel_alone_runs_a_bundle(installed, tiny_bundle, tmp_path):
    """Everything the runtime reads at run time (templates, schemas, profiles) is in the wheel."""
    res = _in_venv(installed, f"edgellm run {tiny_bundle} hello --max-tokens 4 --profile rpi4", tmp_path)
    assert res.returncode == 0 and "completion 4 tok" in res.stderr, res.stderr


def test_the_env_files_settings_are_flags_serve_takes():
    """The unit runs `edgellm serve ${EDGELLM_BUNDLE} --profile ${EDGELLM_PROFILE} $EDGELLM_ARGS`."""
    from edgellm.cli.main import build_parser

    unit = (ROOT / "devices" / "edgellm.service").read_text()
    env = dict(re.findall(r"^(EDGELLM_\w+)=(.*)$", (ROOT / "devices" / "edgellm.env").read_text(), re.M))
    exec_start = re.search(r"^ExecStart=\S+/edgellm (.*)$", unit, re.M)[1]
    argv = shlex.split(re.sub(r"\$\{?(EDGELLM_\w+)\}?", lambda m: env[m[1]], exec_start))
    args = build_parser().parse_args(argv)
    assert args.command == "serve" and str(args.bundle) == env["EDGELLM_BUNDLE"]


def test_the_unit_starts_a_working_serve_from_the_wheel(installed, tiny_bundle, tmp_path):
    """The unit's ExecStart, expanded as systemd does from the shipped env file (the bundle and the
    broker's port moved here; the password in its file), run from the wheel's venv: it logs in as
    the env file's user on a mosquitto that demands the password, answers a request, and on the
    SIGTERM `systemctl stop` sends it exits 0 and leaves its status offline."""
    from mqtt_helpers import Probe, connection, make_password_file, start_broker

    (tmp_path / "broker").mkdir()
    passwd = make_password_file(tmp_path / "broker", "gateway", "s3cret")
    broker = start_broker(tmp_path / "broker", options=(f"password_file {passwd}", "allow_anonymous false"))
    try:
        env = dict(re.findall(r"^(EDGELLM_\w+)=(.*)$", (ROOT / "devices" / "edgellm.env").read_text(), re.M))
        password = tmp_path / "mqtt-password"
        password.write_text("s3cret\n")
        env["EDGELLM_BUNDLE"] = str(tiny_bundle)
        env["EDGELLM_ARGS"] = (env["EDGELLM_ARGS"].replace("mqtt://127.0.0.1:1883", broker.url)
                               .replace("/etc/edgellm/mqtt-password", str(password)))
        assert broker.url in env["EDGELLM_ARGS"] and str(password) in env["EDGELLM_ARGS"], env
        exec_start = re.search(r"^ExecStart=(\S+) (.*)$", (ROOT / "devices" / "edgellm.service").read_text(), re.M)
        assert exec_start[1] == f"{VENV_BIN}edgellm"
        # systemd: ${VAR} is one word, $VAR splits on white space
        argv = [word for token in exec_start[2].split() for word in
                ([env[token[2:-1]]] if token.startswith("${") else env[token[1:]].split() if token.startswith("$")
                 else [token])]
        probe = Probe(connection(broker.url, username="gateway", password="s3cret"))
        proc = subprocess.Popen([str(installed / "bin" / "edgellm"), *argv], cwd=tmp_path, env=_env(installed),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            status = probe.wait(lambda m: m.topic.endswith("/status") and b'"online"' in m.payload, timeout=60)
            device = status.topic.split("/")[1]
            probe.publish(f"edgellm/{device}/request", {"id": "u1", "prompt": "hello", "max_tokens": 4})
            assert probe.replies("u1", timeout=60)[-1]["done"] is True
            proc.terminate()
            assert proc.wait(30) == 0
            probe.wait(lambda m: m.topic.endswith("/status") and b'"offline"' in m.payload, timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
            probe.close()
            print(proc.communicate()[0])  # the service's log, shown when the test fails
    finally:
        broker.close()

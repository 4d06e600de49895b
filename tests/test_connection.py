"""How a failed connection explains itself: the TLS reason surfaces, credentials in a URL never do."""
from __future__ import annotations

import queue
import shutil
import subprocess
from pathlib import Path

import pytest

from edgellm.service.broker import free_port
from edgellm.service.connection import BrokerAddress, connect_async, connect_failure_reason, make_client
from mqtt_helpers import connection, make_tls_files, start_broker

pytestmark = pytest.mark.timeout(60)
SECRET = "s3cr/t@pw"


def _cert_for_another_host(workdir: Path, ca: dict[str, Path]) -> dict[str, Path]:
    """A server certificate from the test CA that names only `elsewhere.invalid`, not 127.0.0.1."""
    key, csr, crt, ext = (workdir / n for n in ("other.key", "other.csr", "other.crt", "other.cnf"))
    ext.write_text("subjectAltName=DNS:elsewhere.invalid\n")

    def run(*cmd: str) -> None:
        subprocess.run(["openssl", *cmd], check=True, capture_output=True)

    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=elsewhere.invalid", "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca["ca"]), "-CAkey", str(workdir / "ca.key"), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(crt))
    return {"ca": ca["ca"], "cert": crt, "key": key}


def _first_failure(url: str, **kw: object) -> str:
    """The reason `connect_failure_reason` gives in `on_connect_fail` for the first failed attempt."""
    reasons: queue.Queue[str] = queue.Queue()
    client = make_client(connection(url, **kw), "why", persistent=False)
    client.on_connect_fail = lambda c, _u: reasons.put(connect_failure_reason(c))
    client.on_connect = lambda *_: reasons.put("connected")
    connect_async(client, connection(url, **kw), persistent=False)
    client.loop_start()
    try:
        return reasons.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def tls_files(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return make_tls_files(tmp_path)


def test_a_certificate_for_another_host_is_named_as_the_reason(tmp_path, tls_files):
    other = _cert_for_another_host(tmp_path, tls_files)
    mosq = start_broker(tmp_path / "broker", (f"cafile {other['ca']}", f"certfile {other['cert']}",
                                              f"keyfile {other['key']}"))
    try:
        url = mosq.url.replace("mqtt://", "mqtts://")
        reason = _first_failure(url, tls_ca=str(tls_files["ca"]))
    finally:
        mosq.close()
    assert reason.startswith("TLS certificate refused: IP address mismatch"), reason
    assert "'127.0.0.1'" in reason and "connect by an address the certificate lists" in reason


def test_an_unknown_ca_and_a_plain_port_each_say_what_is_wrong(tmp_path, tls_files):
    mosq = start_broker(tmp_path / "broker", (f"cafile {tls_files['ca']}", f"certfile {tls_files['cert']}",
                                              f"keyfile {tls_files['key']}"))
    plain = start_broker(tmp_path / "plain")
    try:
        # No --tls-ca: the system store does not know the test CA.
        unknown = _first_failure(mosq.url.replace("mqtt://", "mqtts://"))
        not_tls = _first_failure(plain.url.replace("mqtt://", "mqtts://"), tls_ca=str(tls_files["ca"]))
    finally:
        mosq.close()
        plain.close()
    assert unknown.startswith("TLS certificate refused: ") and "pass the broker's CA with --tls-ca" in unknown, unknown
    assert not_tls.startswith("TLS handshake failed: ") and "does this port speak TLS?" in not_tls, not_tls


def test_nothing_listening_is_a_refused_connection_not_a_tls_problem():
    reason = _first_failure(f"mqtt://127.0.0.1:{free_port()}")
    assert reason == "connection refused (is the broker running on this port?)"


def test_a_success_clears_the_last_failure(tmp_path):
    mosq = start_broker(tmp_path / "broker")
    try:
        assert _first_failure(mosq.url) == "connected"
    finally:
        mosq.close()
    client = make_client(connection(mosq.url), "fresh", persistent=False)
    assert connect_failure_reason(client) == "no reason recorded"


@pytest.mark.parametrize("url", [
    f"mqtt://edge:{SECRET}@broker.local:1883",
    f"mqtts://edge:{SECRET}@broker.local",
    f"edge:{SECRET}@broker.local:1883",
    "mqtt://edge:s3cr/t@broker.local",  # an unescaped / puts half the password in the path
])
def test_a_url_with_credentials_is_refused_without_echoing_them(url):
    with pytest.raises(ValueError) as err:
        BrokerAddress.parse(url)
    message = str(err.value)
    assert "pass credentials with --username/--password-file" in message
    assert "s3cr" not in message and "edge" not in message and "***@broker.local" in message


def test_the_cli_error_line_for_such_a_url_hides_the_password(capsys):
    from edgellm.cli.main import main

    rc = main(["ask", "--broker", f"mqtt://edge:{SECRET}@127.0.0.1:1", "--device-id", "d", "Hi"])
    err = capsys.readouterr().err
    assert rc == 1 and "s3cr" not in err and "mqtt://***@127.0.0.1:1" in err, err

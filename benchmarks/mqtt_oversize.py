"""What one huge request costs the service: issue 9's bar (peak RSS growth <= 64 MB for a 200 MB message).

    python benchmarks/mqtt_oversize.py BUNDLE [--size-mb 200] [--json out.json]

For MQTT 5 and 3.1.1 in turn: a private mosquitto, `edgellm serve BUNDLE` in its own process,
one request of `--size-mb` published by `mosquitto_pub -f` (so no Python process here holds it),
the service's RSS sampled every 5 ms until it has answered a normal request after it. On both
versions the service reads it into a capped buffer and answers `too_large` (issue 19: on MQTT 5
it used to advertise a Maximum Packet Size, and the broker dropped the message unanswered).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from edgellm.service.broker import Mosquitto  # noqa: E402
from edgellm.service.connection import BrokerAddress, Connection, connect_async, make_client  # noqa: E402
from edgellm.service.protocol import Topics  # noqa: E402

BAR_MB = 64.0
T = Topics("edgellm", "oversize")


def write_request(path: Path, size_mb: int) -> None:
    with open(path, "wb") as f:
        f.write(b'{"id": "huge", "prompt": "')
        for _ in range(size_mb):
            f.write(b"x" * (1 << 20))
        f.write(b'"}')


class Device:
    """Listens on the service's status and response topics; `wait` returns the first payload that matches."""

    def __init__(self, url: str) -> None:
        self.replies: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self.client = make_client(Connection(BrokerAddress.parse(url)), "oversize-device", persistent=False)
        self.client.on_connect = lambda c, *_: c.subscribe([(T.status, 1), (T.response("#"), 1)])
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = lambda _c, _u, m: self.replies.append(json.loads(m.payload))
        connect_async(self.client, Connection(BrokerAddress.parse(url)), persistent=False)
        self.client.loop_start()
        self.ready.wait(10)

    def wait(self, match: Any, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((r for r in self.replies if match(r)), None)
            if found is not None:
                return found
            time.sleep(0.02)
        return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(bundle: Path, version: str, message: Path, work: Path) -> dict[str, Any]:
    report.stage(f"MQTT {version}: starting mosquitto and edgellm serve")
    (work / f"broker-{version}").mkdir()
    with Mosquitto(work / f"broker-{version}") as broker:
        proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", str(bundle), "--broker", broker.url,
                                 "--device-id", T.device, "--mqtt-version", version], stderr=subprocess.DEVNULL)
        device = Device(broker.url)
        try:
            if device.wait(lambda r: r.get("state") == "online", 120) is None:
                raise SystemExit("edgellm serve did not come online within 120 s")
            service = psutil.Process(proc.pid)
            base = peak = service.memory_info().rss
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.wait(0.005):
                    peak = max(peak, service.memory_info().rss)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            report.stage(f"MQTT {version}: publishing {message.stat().st_size >> 20} MB")
            flag = "mqttv5" if version == "5" else "mqttv311"
            subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-V", flag, "-q", "1", "-t", T.request,
                            "-f", str(message)], check=True)
            huge = device.wait(lambda r: r.get("id") == "huge", 120)
            device.client.publish(T.request, json.dumps({"id": "after", "prompt": "Hi", "max_tokens": 3}), qos=1)
            after = device.wait(lambda r: r.get("id") == "after" and r.get("done"), 120)
            done.set()
            sampler.join()
        finally:
            device.close()
            proc.terminate()
            proc.wait()
    return {"mqtt_version": version, "rss_base_mb": base / 2**20, "rss_peak_mb": peak / 2**20,
            "rss_growth_mb": (peak - base) / 2**20, "reply": (huge or {}).get("error"),
            "next_request_answered": bool(after)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--size-mb", type=int, default=200)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        message = work / "request.json"
        write_request(message, args.size_mb)
        rows = [run(args.bundle, version, message, work) for version in ("5", "3.1.1")]
    table = "\n".join(
        [f"{'mqtt':<6} {'base MB':>8} {'peak MB':>8} {'growth MB':>10}  reply to the big request / next answered"]
        + [f"{r['mqtt_version']:<6} {r['rss_base_mb']:8.0f} {r['rss_peak_mb']:8.0f} {r['rss_growth_mb']:10.1f}  "
           f"{r['reply'] or 'none'} / {r['next_request_answered']}" for r in rows])
    bars = "\n".join(
        f"{'PASS' if passed(r) else 'FAIL'}  MQTT {r['mqtt_version']}: growth {r['rss_growth_mb']:.1f} MB <= "
        f"{BAR_MB:.0f} MB for {args.size_mb} MB, answered too_large, service still answers"
        for r in rows)
    report.emit({"size_mb": args.size_mb, "runs": rows}, table, bars, args.json)
    return 0 if all(passed(r) for r in rows) else 1


def passed(row: dict[str, Any]) -> bool:
    return (row["rss_growth_mb"] <= BAR_MB and (row["reply"] or {}).get("code") == "too_large"
            and row["next_request_answered"])


if __name__ == "__main__":
    sys.exit(main())

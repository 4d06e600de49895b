"""The MQTT service as devices see it: broker round-trip overhead, and many requests in a row with malformed ones mixed in.

    python benchmarks/mqtt_bench.py BUNDLE [--requests 1000] [--malformed 0.1] [--max-tokens 8] [--json out.json]

A private mosquitto on a free port, `edgellm serve BUNDLE` in a process of its own (so the
device client and the service never share a GIL), and one MQTT 5 device client here that
asks one request at a time with a Response Topic and Correlation Data. Every reply is
matched to its request by the correlation data, so even a request too broken to carry an
id is accounted for. Prints a table and PASS/FAIL lines against issue 4's bars and writes
the raw numbers as JSON; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from edgellm.service.broker import Mosquitto  # noqa: E402
from edgellm.service.connection import BrokerAddress, Connection, make_client  # noqa: E402
from edgellm.service.protocol import BAD_REQUEST, Topics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "bench"
BARS = {"overhead_ms": 10.0, "rss_growth_mb": 10.0}
PROMPTS = (
    "The kitchen is 31 degrees. What should I do?",
    "Is it safe to leave the oven on overnight?",
    "Summarize: the front door opened at 3 am.",
    "Name one way to save water in a garden.",
    "The soil moisture is 12 percent. Water the plants?",
    "Write a short greeting for a smart speaker.",
    "What does a humidity of 80 percent feel like?",
    "Give one tip for a cold bedroom.",
)


@dataclass
class Planned:
    """One request as sent, and what a correct service answers: a final reply, or an error with `code` and `id`."""

    payload: bytes
    kind: str  # "valid" or the malformed family
    code: str | None = None
    error_id: str | None = None


def _malformed(i: int, family: str, variant: int) -> Planned:
    rid = f"m{i}"
    if family == "bad_json":
        payloads = [b'{"id": "%s", "prompt": "Hi"' % rid.encode(), b"temperature=0.7", b"\xff\xfe{}",
                    b'{"id": "%s", "prompt": "Hi", "top_p": NaN}' % rid.encode()]
        return Planned(payloads[variant % len(payloads)], family, BAD_REQUEST, None)
    bodies = {
        "wrong_type": [{"id": rid, "prompt": 42}, {"id": rid, "prompt": "Hi", "max_tokens": "8"},
                       {"id": rid, "prompt": "Hi", "temperature": True}, {"id": rid, "messages": "Hi"}],
        "unknown_field": [{"id": rid, "prompt": "Hi", "max_token": 8}, {"id": rid, "prompt": "Hi", "room": "kitchen"}],
        "empty_prompt": [{"id": rid, "prompt": ""}, {"id": rid, "prompt": "  \n"},
                         {"id": rid, "messages": [{"role": "user", "content": ""}]}],
    }[family]
    return Planned(json.dumps(bodies[variant % len(bodies)]).encode(), family, BAD_REQUEST, rid)


FAMILIES = ("bad_json", "wrong_type", "unknown_field", "empty_prompt")


def plan(n: int, malformed: float, max_tokens: int, seed: int = 0) -> list[Planned]:
    """`n` requests, round(n * malformed) of them malformed at random places, the families taking turns."""
    rng = random.Random(seed)
    bad = sorted(rng.sample(range(n), round(n * malformed)))
    out = []
    for i in range(n):
        if bad and bad[0] == i:
            turn = len(out) - sum(p.kind == "valid" for p in out)
            out.append(_malformed(i, FAMILIES[turn % len(FAMILIES)], turn // len(FAMILIES)))
            bad.pop(0)
            continue
        text = f"{PROMPTS[i % len(PROMPTS)]} (reading {i})"
        body: dict[str, Any] = {"id": f"r{i}", "max_tokens": max_tokens, "temperature": 0}
        if i % 2:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        out.append(Planned(json.dumps(body).encode(), "valid"))
    return out


@dataclass
class Outcome:
    """Everything received for one request, with arrival times."""

    sent: float
    replies: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    @property
    def terminals(self) -> list[dict[str, Any]]:
        return [r for _, r in self.replies if r.get("done") or r.get("status") == "error"]


def verdict(p: Planned, o: Outcome) -> str:
    """'ok', 'lost', 'duplicate' or 'wrong' (one reply, but not the one a correct service sends)."""
    ends = o.terminals
    if not ends:
        return "lost"
    if len(ends) > 1:
        return "duplicate"
    *chunks, last = [r for _, r in o.replies]
    if last is not ends[0]:
        return "wrong"  # something arrived after the final reply
    if p.kind != "valid":
        good = last.get("status") == "error" and last.get("error", {}).get("code") == p.code
        return "ok" if good and last.get("id") == p.error_id and not chunks else "wrong"
    streamed = [c.get("seq") for c in chunks] == list(range(len(chunks))) and \
        "".join(c.get("delta", "") for c in chunks) == last.get("text")
    return "ok" if last.get("done") is True and streamed else "wrong"


class Device:
    """An MQTT 5 device client: one reply topic, one correlation per request."""

    def __init__(self, broker: Mosquitto, topics: Topics) -> None:
        self.topics = topics
        self.reply_topic = f"bench/{uuid.uuid4().hex[:8]}/replies"
        self.inbox: queue.Queue[tuple[float, mqtt.MQTTMessage]] = queue.Queue()
        # The connection code of `edgellm ask`, so the device's socket is set up as the product's own client's is.
        self.client = make_client(Connection(BrokerAddress.parse(broker.url)), f"bench-{os.getpid()}", persistent=False)
        # perf_counter in paho's network thread: the arrival time, not when the main thread gets to it.
        self.client.on_message = lambda _c, _u, msg: self.inbox.put((time.perf_counter(), msg))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.client.subscribe([(self.reply_topic, 1), (topics.status, 1)])

    def wait_online(self, service: subprocess.Popen, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and service.poll() is None:
            try:
                _, msg = self.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            # A retained status is an earlier service's: this one's arrives live (subscribe first).
            if msg.topic == self.topics.status and not msg.retain and _json(msg.payload).get("state") == "online":
                return True
        return False

    def send(self, i: int, payload: bytes) -> float:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = str(i).encode()
        sent = time.perf_counter()
        self.client.publish(self.topics.request, payload, qos=1, properties=props)
        return sent

    def collect(self, outcomes: dict[int, Outcome], until: int | None, timeout: float) -> None:
        """File replies under their request until request `until` has its final or error (None: drain for `timeout`)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                arrived, msg = self.inbox.get(timeout=left)
            except queue.Empty:
                return
            if msg.topic != self.reply_topic:
                continue
            corr = getattr(msg.properties, "CorrelationData", b"")
            key = int(corr) if corr.isdigit() else -1
            outcomes.setdefault(key, Outcome(sent=float("nan"))).replies.append((arrived, _json(msg.payload)))
            if until is not None and key == until and outcomes[key].terminals:
                return

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "median": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {"n": len(values), "median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1]}


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    planned = plan(args.requests, args.malformed, args.max_tokens)
    topics = Topics("edgellm", DEVICE)
    (work / "broker").mkdir()
    broker = Mosquitto(work / "broker").start()
    log_path = work / "serve.log"
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", str(args.bundle), "--broker", broker.url,
           "--device-id", DEVICE, "--client-id", f"bench-service-{os.getpid()}", "--mqtt-version", "5"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    logfile = open(log_path, "w")
    device = Device(broker, topics)  # subscribed before the service can say it is online
    service = subprocess.Popen(cmd, cwd=ROOT, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        report.stage(f"mosquitto on {broker.url}; waiting for `edgellm serve` (pid {service.pid}, log {log_path})")
        if not device.wait_online(service, args.timeout):
            raise SystemExit(f"mqtt_bench: the service did not come online within {args.timeout:.0f} s; "
                             f"its log ends:\n{_tail(log_path)}")
        outcomes: dict[int, Outcome] = {}
        rss: dict[int, float] = {}
        warmup = min(args.warmup, len(planned))
        started = time.perf_counter()
        for i, p in enumerate(planned):
            if service.poll() is not None:
                report.stage(f"the service exited (code {service.returncode}) after {i} requests; its log ends:\n"
                      f"{_tail(log_path)}")
                break
            outcomes[i] = Outcome(sent=device.send(i, p.payload))
            device.collect(outcomes, until=i, timeout=args.timeout)
            done = i + 1
            if done == warmup or done % 100 == 0 or done == len(planned):
                try:
                    rss[done] = psutil.Process(service.pid).memory_info().rss / report.MB
                except psutil.NoSuchProcess:
                    pass
            if done % 100 == 0:
                report.stage(f"{done}/{len(planned)} requests ({time.perf_counter() - started:.0f} s)")
        elapsed = time.perf_counter() - started
        device.collect(outcomes, until=None, timeout=1.0)  # a late duplicate would land here
        alive = service.poll() is None
    finally:
        if device is not None:
            device.close()
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(15)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
        logfile.close()
        broker.close()
    return summarize(args, planned, outcomes, rss, warmup, elapsed, alive, service.returncode)


def summarize(args: argparse.Namespace, planned: list[Planned], outcomes: dict[int, Outcome], rss: dict[int, float],
              warmup: int, elapsed: float, alive: bool, exit_code: int) -> dict[str, Any]:
    verdicts: dict[str, int] = {"ok": 0, "lost": 0, "duplicate": 0, "wrong": 0}
    by_kind: dict[str, dict[str, int]] = {}
    failures, round_trip, ttft, overhead, total = [], [], [], [], []
    for i, p in enumerate(planned):
        o = outcomes.get(i, Outcome(sent=float("nan")))
        v = verdict(p, o)
        verdicts[v] += 1
        by_kind.setdefault(p.kind, {"sent": 0, "ok": 0})["sent"] += 1
        by_kind[p.kind]["ok"] += v == "ok"
        if v != "ok" and len(failures) < 10:
            failures.append({"request": i, "kind": p.kind, "verdict": v, "payload": p.payload.decode("utf-8", "replace"),
                             "replies": [r for _, r in o.replies]})
        if p.kind != "valid" or v != "ok":
            continue
        total.append((o.replies[-1][0] - o.sent) * 1e3)
        if len(o.replies) > 1:  # a final-only answer (EOS first) has no first chunk to time
            first = (o.replies[0][0] - o.sent) * 1e3
            model = o.replies[-1][1].get("usage", {}).get("ttft_s", float("nan")) * 1e3
            round_trip.append(first)
            ttft.append(model)
            overhead.append(first - model)
    unexplained = {k: v for k, v in outcomes.items() if not 0 <= k < len(planned)}
    growth = rss[max(rss)] - rss[warmup] if warmup in rss and rss else None
    results: dict[str, Any] = {
        "settings": {"bundle": str(args.bundle), "requests": len(planned), "malformed": args.malformed,
                     "max_tokens": args.max_tokens, "threads": args.threads, "mqtt_version": "5",
                     "broker": "mosquitto (127.0.0.1)", "service": "edgellm serve (own process)",
                     "rss_baseline_after": warmup},
        "elapsed_s": elapsed,
        "requests_per_s": sum(0 <= k < len(planned) for k in outcomes) / elapsed if elapsed else None,
        "verdicts": verdicts,
        "by_kind": by_kind,
        "unmatched_replies": sum(len(o.replies) for o in unexplained.values()),
        "failures": failures,
        "latency_ms": {"round_trip": _stats(round_trip), "model_ttft": _stats(ttft),
                       "overhead": _stats(overhead), "request_total": _stats(total)},
        "service": {"alive_at_end": alive, "exit_code": exit_code,
                    "rss_mb": {str(k): v for k, v in sorted(rss.items())}, "rss_growth_mb": growth},
    }
    results["bars"] = bars(results)
    return results


def bars(r: dict[str, Any]) -> list[dict[str, Any]]:
    overhead = r["latency_ms"]["overhead"]["median"]
    growth = r["service"]["rss_growth_mb"]
    all_ok = r["verdicts"]["ok"] == r["settings"]["requests"] and r["unmatched_replies"] == 0
    checks = [
        ("broker round-trip overhead median <= 10 ms", overhead, " ms",
         overhead is not None and overhead <= BARS["overhead_ms"]),
        ("every request answered exactly once, errors with the right code", r["verdicts"]["ok"],
         f" of {r['settings']['requests']}", all_ok),
        ("service process alive at the end", r["service"]["alive_at_end"], "", r["service"]["alive_at_end"]),
        (f"service RSS growth after request {r['settings']['rss_baseline_after']} <= 10 MB", growth, " MB",
         growth is not None and growth <= BARS["rss_growth_mb"]),
    ]
    return [{"name": name, "value": value, "unit": unit, "status": "PASS" if passed else "FAIL"}
            for name, value, unit, passed in checks]


def table(r: dict[str, Any]) -> str:
    s, lat, svc, v = r["settings"], r["latency_ms"], r["service"], r["verdicts"]

    def row(label: str, st: dict[str, Any]) -> str:
        if not st["n"]:
            return f"{label:<34} (no sample)"
        return f"{label:<34} {st['median']:8.2f} {st['p90']:8.2f} {st['max']:8.2f} {st['n']:6d}"

    rss = svc["rss_mb"]
    lines = [
        f"MQTT service: {s['requests']} requests ({s['malformed']:.0%} malformed), max_tokens {s['max_tokens']}, "
        f"MQTT 5, mosquitto on loopback, {r['elapsed_s']:.0f} s ({r['requests_per_s']:.1f} req/s)",
        f"{'ms':<34} {'median':>8} {'p90':>8} {'max':>8} {'n':>6}",
        row("publish -> first chunk", lat["round_trip"]),
        row("model TTFT (usage.ttft_s)", lat["model_ttft"]),
        row("broker overhead (difference)", lat["overhead"]),
        row("publish -> final reply", lat["request_total"]),
        "",
        f"{'kind':<14} {'sent':>6} {'ok':>6}",
        *(f"{k:<14} {c['sent']:6d} {c['ok']:6d}" for k, c in r["by_kind"].items()),
        f"lost {v['lost']}, duplicated {v['duplicate']}, wrong reply {v['wrong']}, "
        f"replies matching no request {r['unmatched_replies']}",
        "service RSS MB: " + ", ".join(f"{k}: {mb:.1f}" for k, mb in rss.items())
        + f"; alive at end: {svc['alive_at_end']} (exit code after SIGTERM: {svc['exit_code']})",
    ]
    return "\n".join(lines)


def bar_lines(checks: list[dict[str, Any]]) -> str:
    def shown(c: dict[str, Any]) -> str:
        value = c["value"]
        if value is None:
            return "not measured"
        return f"{value:.2f}{c['unit']}" if isinstance(value, float) else f"{value}{c['unit']}"

    return "\n".join(f"{c['status']:4}  {c['name']}  ({shown(c)})" for c in checks)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path, help="bundle directory written by `edgellm export`")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--malformed", type=float, default=0.1, help="fraction of malformed requests (default 0.1)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per valid request (short: the bench times MQTT)")
    p.add_argument("--warmup", type=int, default=100, help="requests before the RSS baseline (default 100)")
    p.add_argument("--threads", type=int, help="the service's onnxruntime threads (default: its profile's)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for start-up and for each reply")
    p.add_argument("--json", type=Path, help="write the raw results here")
    args = p.parse_args(argv)
    if args.requests < 1 or not 0 <= args.malformed <= 1 or args.max_tokens < 1:
        p.error("--requests and --max-tokens must be at least 1, --malformed in [0, 1]")
    if not (args.bundle / "manifest.json").is_file():
        p.error(f"{args.bundle}: no manifest.json (not a bundle written by `edgellm export`)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = report.machine_info()
    report.warn_if_busy(machine)
    with tempfile.TemporaryDirectory(prefix="edgellm-mqtt-bench-") as tmp:
        results = run(args, Path(tmp))
    results["machine"] = {**machine, "load_average_end": os.getloadavg()[0]}
    report.emit(results, table(results), bar_lines(results["bars"]), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

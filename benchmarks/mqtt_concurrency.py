"""Many devices at once over MQTT: continuous batching against one request at a time (issue 14's bar).

    python benchmarks/mqtt_concurrency.py BUNDLE [--slots 8] [--max-tokens 48] [--repeats 2]
        [--workloads short,long] [--json out.json]

A private mosquitto and `edgellm serve BUNDLE` in a process of its own, alternately with
`--slots 1` (requests wait in the queue, as before batching) and `--slots N`. For 1, 2, 4
and 8 devices publishing a request at the same moment (distinct prompts, greedy, streamed),
it takes each request's time to its first chunk and to its final reply, and the aggregate
completion tokens per second of the whole burst (tokens over the time from the first publish
to the last final). Two workloads: "short", the smart-home questions of mqtt_bench.py, which
SmolLM2 answers in 10-48 tokens, so a burst's time is mostly its longest answer and each
request's prefill; and "long", requests for explanations that run to `--max-tokens` (the share
that did is reported), which is what the batching bars are about: equal answers decoded
together. Progress on stderr; the tables and PASS/FAIL lines on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from edgellm.service.broker import Mosquitto  # noqa: E402
from edgellm.service.protocol import Topics  # noqa: E402
from mqtt_bench import DEVICE, PROMPTS, ROOT, Device, Outcome  # noqa: E402

BURSTS = (1, 2, 4, 8)
LONG = (
    "Explain in detail how a centrifugal pump works, step by step.",
    "Describe every step of replacing a worn conveyor belt in a factory.",
    "Write a detailed maintenance checklist for an industrial air compressor.",
    "Explain in detail why a heat exchanger loses efficiency over time and what to do about it.",
    "Describe, step by step, how to calibrate a pressure sensor on a production line.",
    "Write a detailed guide to troubleshooting an electric motor that overheats.",
    "Explain in detail how a PLC scan cycle works and why it matters.",
    "Describe in detail how to store and handle lubricants in a workshop.",
)
WORKLOADS = {"short": PROMPTS, "long": LONG}
BARS = {4: 1.8, 8: 2.5}  # aggregate tok/s with slots over one at a time


def burst(device: Device, n: int, max_tokens: int, tag: str, timeout: float,
          prompts: tuple[str, ...] = PROMPTS) -> dict[str, Any]:
    outcomes: dict[int, Outcome] = {}
    for i in range(n):
        body = {"id": f"{tag}-{i}", "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                "max_tokens": max_tokens, "temperature": 0}
        outcomes[i] = Outcome(sent=device.send(i, json.dumps(body).encode()))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(o.terminals for o in outcomes.values()):
        device.collect(outcomes, until=None, timeout=0.2)
    finals = {i: o.terminals[0] for i, o in outcomes.items() if o.terminals and o.terminals[0].get("done")}
    if len(finals) != n:
        raise SystemExit(f"mqtt_concurrency: {n - len(finals)} of {n} requests got no final reply")
    first = [min(t for t, r in o.replies if not r.get("done")) - o.sent for o in outcomes.values()
             if any(not r.get("done") for _, r in o.replies)]
    total = [max(t for t, _ in o.replies) - o.sent for o in outcomes.values()]
    tokens = sum(f["usage"]["completion_tokens"] for f in finals.values())
    span = max(max(t for t, _ in o.replies) for o in outcomes.values()) - min(o.sent for o in outcomes.values())
    ran_out = sum(f.get("finish_reason") == "length" for f in finals.values())
    return {"tokens": tokens, "aggregate_tok_s": tokens / span, "ttft_s": first, "total_s": total,
            "length_share": ran_out / n}


def serve(bundle: Path, broker: Mosquitto, slots: int, threads: int, log: Path) -> subprocess.Popen:
    # A client id of its own: one reused would resume the session an earlier service left, and the
    # broker would hand it every request that earlier service missed while the other one served.
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", str(bundle), "--broker", broker.url, "--device-id", DEVICE,
           "--client-id", f"bench-service-{os.getpid()}-{log.stem}", "--mqtt-version", "5", "--slots", str(slots),
           "--queue-size", "16", "--queue-per-client", "16", "--threads", str(threads)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    broker = Mosquitto(work / "broker").start()
    topics = Topics("edgellm", DEVICE)
    results: dict[str, Any] = {}
    try:
        # Repetitions alternate the two services, so a busier minute of a shared machine falls on both.
        for rep in range(args.repeats):
            for slots in (1, args.slots) if rep % 2 == 0 else (args.slots, 1):
                report.stage(f"edgellm serve --slots {slots} ({rep + 1}/{args.repeats})")
                log = work / f"serve-{slots}-{rep}.log"
                device = Device(broker, topics)  # subscribed before the service can say it is online
                service = serve(args.bundle, broker, slots, args.threads, log)
                try:
                    if not device.wait_online(service, 300):
                        raise SystemExit(f"the service did not come online; see {log}")
                    burst(device, 1, 4, "warm", 120)
                    for kind in args.workloads:
                        for n in BURSTS:
                            report.stage(f"slots {slots}, {kind}: {n} devices at once ({rep + 1}/{args.repeats})")
                            got = burst(device, n, args.max_tokens, f"s{slots}-{kind}-n{n}-r{rep}", 600,
                                        WORKLOADS[kind])
                            results.setdefault(f"{kind}/{slots}/{n}", []).append(got)
                finally:
                    device.close()
                    service.send_signal(signal.SIGTERM)
                    service.wait(30)
    finally:
        broker.close()
    return results


def summary(results: dict[str, Any], slots: int, work: str) -> dict[str, Any]:
    out = {}
    for n in BURSTS:
        row = {}
        for s in (1, slots):
            runs = results[f"{work}/{s}/{n}"]
            ttft = sorted(t for r in runs for t in r["ttft_s"])
            row[s] = {"aggregate_tok_s": statistics.median(r["aggregate_tok_s"] for r in runs),
                      "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
                      "slowest_s": statistics.median(max(r["total_s"]) for r in runs),
                      "length_share": statistics.mean(r["length_share"] for r in runs)}
        row["ratio"] = row[slots]["aggregate_tok_s"] / row[1]["aggregate_tok_s"]
        out[n] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workloads", default="short,long", help="comma-separated: short, long (see above)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.workloads = args.workloads.split(",")
    if unknown := set(args.workloads) - set(WORKLOADS):
        p.error(f"--workloads: unknown {sorted(unknown)}; choose from {sorted(WORKLOADS)}")
    machine = report.machine_info()
    report.warn_if_busy(machine)
    with tempfile.TemporaryDirectory(prefix="edgellm-conc-") as tmp:
        (Path(tmp) / "broker").mkdir()
        results = measure(args, Path(tmp))
    s = args.slots
    tables, checks, out = [], [], {}
    for work in args.workloads:
        rows = out[work] = summary(results, s, work)
        ran_out = statistics.mean(r[k]["length_share"] for r in rows.values() for k in (1, s))
        lines = [f"{work}: {ran_out:.0%} of the answers ran to --max-tokens {args.max_tokens}",
                 f"{'devices':>7} | {'one at a time tok/s':>19} | {f'{s} slots tok/s':>14} | {'ratio':>6} | "
                 f"{'TTFT p50/p99 (1 slot)':>22} | {f'TTFT p50/p99 ({s} slots)':>22} | {'slowest 1 / N slots':>19}"]
        for n, r in rows.items():
            a, b = r[1], r[s]
            lines.append(f"{n:>7} | {a['aggregate_tok_s']:19.1f} | {b['aggregate_tok_s']:14.1f} | {r['ratio']:5.2f}x | "
                         f"{a['ttft_p50_s'] * 1000:9.0f}/{a['ttft_p99_s'] * 1000:.0f} ms | "
                         f"{b['ttft_p50_s'] * 1000:9.0f}/{b['ttft_p99_s'] * 1000:.0f} ms | "
                         f"{a['slowest_s']:8.1f} / {b['slowest_s']:.1f} s")
        tables.append("\n".join(lines))
        checks += [report._bar(f"{work}, {n} devices: aggregate tok/s with slots >= {bar}x one at a time",
                               rows[n]["ratio"], bar, True) for n, bar in BARS.items() if n in rows]
        checks += [report._bar(f"{work}, {n} devices: the slowest request finishes no later than in the queue",
                               rows[n][s]["slowest_s"] / rows[n][1]["slowest_s"], 1.0, False) for n in (4, 8)]
    report.emit({"machine": machine, "bundle": str(args.bundle), "slots": s, "max_tokens": args.max_tokens,
                 "workloads": out}, "\n\n".join(tables), report.bar_lines(checks), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Simulated factory sensors with injected faults, publishing anomaly events for the anomaly recipe.

Each machine has three sensors: vibration (mm/s RMS), temperature (°C) and motor current (A),
read `--rate` times a second with noise around a baseline. Faults are injected on the first
machines, one each: a bearing wearing out (vibration ramps up, the housing warms), a cooling
failure (temperature climbs towards a plateau), a jamming load (short current spikes) and a
temperature sensor dropping out (it reads 0 for 2 s every 8 s).
A reading outside its sensor's band is published as an anomaly event on
`{prefix}/{machine}/{sensor}/anomaly`, the recipe's default filter `factory/+/+/anomaly`; with
every reading of an excursion sent (the default), a fault makes the storms the recipe coalesces.

    python scripts/simulate_sensors.py --broker mqtt://127.0.0.1:1883 --duration 120
    python scripts/simulate_sensors.py --dry-run --duration 60 | head     # events to stdout, no broker
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
if TYPE_CHECKING:
    from paho.mqtt.reasoncodes import ReasonCode

    from edgellm.service.connection import Client, Connection


@dataclass(frozen=True)
class Sensor:
    name: str
    unit: str
    baseline: float
    low: float  # the band: a reading outside [low, high] is an anomaly
    high: float
    noise: float  # standard deviation of a healthy reading


SENSORS = (
    # ISO 10816 puts 2.8 mm/s RMS at the top of "good" for a medium machine, 4.5 at "alert"
    Sensor("vibration", "mm/s", 2.2, 0.0, 4.5, 0.15),
    Sensor("temperature", "°C", 55.0, 10.0, 75.0, 0.4),
    Sensor("current", "A", 12.0, 8.0, 16.0, 0.25),
)
FAULTS = ("bearing", "overheat", "spike", "dropout")


def fault_offset(fault: str, sensor: str, t: float, rng: random.Random) -> float:
    """How far `fault`, `t` seconds after it started, moves `sensor` from its healthy value."""
    if t < 0:
        return 0.0
    if fault == "bearing":  # wear grows steadily, and so does the scatter of the readings
        wear = min(t / 40.0, 1.0)
        return {"vibration": 7.0 * wear + rng.gauss(0, 0.6 * wear), "temperature": 9.0 * wear}.get(sensor, 0.0)
    if fault == "overheat":  # a failed fan: the temperature approaches a plateau 40 °C higher
        heat = 1.0 - math.exp(-t / 20.0)
        return {"temperature": 40.0 * heat, "current": 1.2 * heat}.get(sensor, 0.0)
    if fault == "spike" and sensor == "current":  # a jam every 7 s draws 2.5x the current for a second
        return 1.5 * 12.0 * (1.0 + rng.gauss(0, 0.05)) if t % 7.0 < 1.0 else 0.0
    return 0.0


def readings(machines: int, faults: tuple[str, ...], rate: float, duration: float, fault_start: float,
             seed: int) -> Iterator[tuple[float, str, Sensor, float]]:
    """(seconds since start, machine, sensor, value) for every reading, in time order; forever if duration is 0."""
    rng = random.Random(seed)
    names = [f"{kind}-{i + 1}" for i, kind in zip(range(machines), ("press", "pump", "mill", "lathe") * 99)]
    injected = {names[i]: (fault, fault_start + 5.0 * i) for i, fault in enumerate(faults[:machines])}
    tick = 0
    while duration <= 0 or tick / rate < duration:
        t = tick / rate
        for m, machine in enumerate(names):
            fault, start = injected.get(machine, (None, 0.0))
            for sensor in SENSORS:
                drift = 0.3 * sensor.noise * math.sin(t / 30.0 + m)  # a slow, harmless wander
                value = sensor.baseline + drift + rng.gauss(0, sensor.noise)
                if fault is not None:
                    value += fault_offset(fault, sensor.name, t - start, rng)
                if fault == "dropout" and sensor.name == "temperature" and 0 <= t - start and (t - start) % 8 < 2:
                    value = 0.0  # a loose connector: the input reads its floor
                yield t, machine, sensor, round(max(value, 0.0), 2)
        tick += 1


def events(args: argparse.Namespace, started: datetime) -> Iterator[tuple[float, str, dict]]:
    """(seconds since start, topic, event) for each reading outside its band."""
    outside: set[tuple[str, str]] = set()
    count = 0
    faults = tuple(f for f in args.faults.split(",") if f)
    for t, machine, sensor, value in readings(args.machines, faults, args.rate, args.duration,
                                              args.fault_start, args.seed):
        key = (machine, sensor.name)
        if sensor.low <= value <= sensor.high:
            outside.discard(key)
            continue
        if args.once and key in outside:
            continue
        outside.add(key)
        count += 1
        stamp = (started + timedelta(seconds=t)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        event = {"id": f"sim-{args.seed}-{count}", "machine": machine, "sensor": sensor.name, "value": value,
                 "baseline": sensor.baseline, "unit": sensor.unit, "timestamp": stamp,
                 "context": {"band": [sensor.low, sensor.high], "line": "A"}}
        yield t, f"{args.topic_prefix}/{machine}/{sensor.name}/anomaly", event


def connect(conn: "Connection", client_id: str, *, downgrade: bool, timeout: float = 10.0) -> "Client | str":
    """A connected client, or one line on why not. With `downgrade`, a broker that refuses MQTT 5
    (amqtt, the Python fallback broker, speaks only 3.1.1) is asked again over 3.1.1, as `edgellm ask` does."""
    from edgellm.service.connection import (connect_async, connect_failure_reason, make_client, over_311, refusal,
                                            refuses_v5)

    client = make_client(conn, client_id, persistent=False)
    refused: list[object] = []

    def on_connect(_c: object, _u: object, _f: object, reason: "ReasonCode", _p: object) -> None:
        if reason.is_failure:
            refused.append(reason)

    client.on_connect = on_connect
    connect_async(client, conn, persistent=False)
    client.loop_start()
    deadline = time.monotonic() + timeout
    try:
        while not client.is_connected():
            if refused:
                if downgrade and refuses_v5(conn, refused[0]):
                    return connect(over_311(conn), client_id, downgrade=False, timeout=timeout)
                return f"broker {conn.broker}: {refusal(refused[0]) or refused[0]}"
            if time.monotonic() > deadline:
                return f"cannot connect to {conn.broker} within {timeout:g}s ({connect_failure_reason(client)})"
            time.sleep(0.05)
    finally:
        if not client.is_connected():
            client.disconnect()
            client.loop_stop()
    return client


def publish(args: argparse.Namespace) -> int:
    from edgellm.service.connection import BrokerAddress, Connection

    conn = Connection(broker=BrokerAddress.parse(args.broker), mqtt_version=args.mqtt_version or "5")
    client = connect(conn, f"edgellm-simulator-{args.seed}", downgrade=args.mqtt_version is None)
    if isinstance(client, str):
        print(f"simulate_sensors: {client}", file=sys.stderr)
        return 1
    print(f"simulate_sensors: publishing anomaly events to {conn.broker} "
          f"{'for ever' if args.duration == 0 else f'for {args.duration:g} s'} (-v logs each)", file=sys.stderr)
    start, sent = time.monotonic(), 0
    try:
        for t, topic, event in events(args, datetime.now(timezone.utc)):
            time.sleep(max(start + t - time.monotonic(), 0.0))  # readings come in real time
            client.publish(topic, json.dumps(event, ensure_ascii=False), qos=1)
            sent += 1
            if args.verbose:
                print(f"{topic} {event['value']} {event['unit']}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    print(f"simulate_sensors: {sent} anomaly events published to {conn.broker}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="default: %(default)s")
    p.add_argument("--mqtt-version", choices=("5", "3.1.1"),
                   help="default: 5, or 3.1.1 when the broker refuses 5 (amqtt, the Python fallback broker)")
    p.add_argument("--topic-prefix", default="factory", help="events go to PREFIX/MACHINE/SENSOR/anomaly "
                                                             "(default: %(default)s)")
    p.add_argument("--machines", type=int, default=4, help="how many machines (default: %(default)s)")
    p.add_argument("--faults", default=",".join(FAULTS),
                   help=f"faults to inject, one per machine in this order, from {','.join(FAULTS)} "
                        "(default: all four; '' for none)")
    p.add_argument("--rate", type=float, default=1.0, help="readings per second of each sensor (default: %(default)s)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds to run, 0 for ever (default: %(default)s)")
    p.add_argument("--fault-start", type=float, default=10.0,
                   help="seconds before the first fault starts; each next one 5 s later (default: %(default)s)")
    p.add_argument("--once", action="store_true", help="one event per excursion instead of one per reading")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same readings (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="print 'TOPIC EVENT' lines at once instead of publishing in real time")
    p.add_argument("-v", "--verbose", action="store_true", help="log every published event to stderr")
    args = p.parse_args(argv)
    if args.machines < 1 or args.rate <= 0 or args.duration < 0:
        p.error("--machines must be at least 1, --rate above 0 and --duration at least 0")
    unknown = set(filter(None, args.faults.split(","))) - set(FAULTS)
    if unknown:
        p.error(f"--faults: unknown {sorted(unknown)}; choose from {','.join(FAULTS)}")
    if args.dry_run:
        try:
            for _, topic, event in events(args, datetime(2025, 1, 1, tzinfo=timezone.utc)):
                print(topic, json.dumps(event, ensure_ascii=False))
        except BrokenPipeError:  # `| head`: the reader has all it wants
            sys.stdout = None  # type: ignore[assignment]  # nothing left to flush at exit
        return 0
    logging.basicConfig(format="simulate_sensors: %(message)s", level=logging.WARNING)
    return publish(args)


if __name__ == "__main__":
    sys.exit(main())

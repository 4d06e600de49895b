"""Which process owns a scratch directory, so a later run removes only what a dead process left.

SIGKILL runs no cleanup: a killed export leaves its half-written bundle, a killed `edgellm serve`
its broker's directory. Each such directory gets a marker naming its owner (host, pid, and the
pid's start time, so a reused pid is not taken for the owner). Only a marker whose owner is
provably gone lets another run remove what it marks; two live runs never touch each other's work.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def mark(marker: Path) -> None:
    """Write `marker`, naming this process as the owner of what it marks."""
    pid = os.getpid()
    marker.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "start": start_time(pid)}) + "\n")


def owner_gone(marker: Path) -> bool:
    """True only when `marker` was written on this host by a process that no longer runs.

    An unreadable marker or another host's (a shared network disk) is never taken as gone.
    """
    try:
        owner = json.loads(marker.read_text())
        host, pid, start = owner["host"], int(owner["pid"]), owner["start"]
    except (OSError, ValueError, TypeError, KeyError):
        return False
    if host != socket.gethostname():
        return False
    return not pid_running(pid) or (start is not None and start_time(pid) not in (None, start))


def pid_running(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet reaped by its parent) does not."""
    stat = _stat(pid)
    if stat is not None:
        return stat[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def start_time(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (Linux); None where /proc cannot tell."""
    stat = _stat(pid)
    return stat[19] if stat is not None else None


def cmdline(pid: int) -> list[str] | None:
    """`pid`'s argv (Linux; [] once it has exited), None where /proc cannot tell."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return [] if Path("/proc/self").exists() else None
    except OSError:
        return None
    return raw.decode("utf-8", "replace").split("\0")[:-1]


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; the command name before it may hold spaces."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None

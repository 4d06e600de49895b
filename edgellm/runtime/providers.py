"""Execution providers: which accelerator opens a bundle's graph, and falling back to the CPU.

A board's profile names providers best first; built-in ones come with the onnxruntime build,
plugin ones (OpenVINO, QNN) from a package registered into the stock wheel. Whatever is
missing or fails, the graph still opens on the CPU and the log says why in one line.
"""
from __future__ import annotations

import importlib
import logging
import os
import platform
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import onnxruntime as ort

from ..errors import BundleError

log = logging.getLogger("edgellm")

CPU = "CPUExecutionProvider"
ProviderSpec = Union[str, tuple[str, dict[str, Any]]]

def session_options(threads: int | None = None, block_sums: bool = False) -> ort.SessionOptions:
    """The runtime's options for a bundle's graph. `block_sums` (Graph.block_sums): on aarch64,
    keep int4 matmuls on MLAS's kernel, which quantizes activations per block as on x86;
    KleidiAI's (taken where weights have no zero points) uses one int8 scale per row, and the
    appended block sums rounded that coarsely cost the default SmolLM2 bundle 1.071x its
    source's perplexity on a Cortex-A76 (Pi 5) against 1.004x with MLAS
    (benchmarks/arm64_quality.py). Bundles without block sums keep KleidiAI's speed."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0  # 0: onnxruntime picks one per core
    # A decode step is a chain of nodes (a batched step too): parallelism between nodes only costs threads.
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Errors only: a provider that takes part of a graph warns per node it leaves to the
    # CPU, and edgellm says in one line which provider runs and why another did not.
    so.log_severity_level = 3
    if block_sums and platform.machine().lower() in ("aarch64", "arm64"):
        so.add_session_config_entry("mlas.disable_kleidiai", "1")
    return so


def _name(entry: ProviderSpec) -> str:
    return entry if isinstance(entry, str) else entry[0]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Accelerators shipped as plugin execution providers, loaded into the stock onnxruntime
# wheel: the provider's name -> (its Python package, the edgellm extra that installs it).
PLUGINS = {
    "OpenVINOExecutionProvider": ("onnxruntime_ep_openvino", "openvino"),
    "QNNExecutionProvider": ("onnxruntime_qnn", "qnn"),
}
# A plugin provider's device types, tried in this order unless its profile entry says
# `devices = "GPU,CPU"` (edgellm's own option; the rest go to the provider as they are).
DEVICE_ORDER = "NPU,GPU,CPU"
_registered: set[str] = set()


def create_session(
    path: str | os.PathLike[str],
    *,
    providers: Sequence[ProviderSpec] | None = None,
    threads: int | None = None,
    block_sums: bool = False,
) -> ort.InferenceSession:
    """Open `path` on the first provider that works, ending on the CPU.

    A board's profile may name an accelerator that this onnxruntime build lacks, whose
    plugin package is not installed, that has no device here, or that fails on this
    graph; the model should still run, slower, and say why in one line.
    """
    path = Path(path)
    options = partial(session_options, threads, block_sums)
    available = set(ort.get_available_providers())
    cpu: ProviderSpec = CPU
    for entry in providers or ():
        name = _name(entry)
        if name == CPU:
            cpu = entry
            break
        if name in available and name not in _registered:
            session = _builtin_session(path, entry, options)
        elif name in PLUGINS:
            session = _plugin_session(path, name, {} if isinstance(entry, str) else entry[1], options)
        else:
            log.warning("provider %s is not available in this onnxruntime (has %s); trying the next",
                        name, ", ".join(sorted(available)))
            continue
        if session is not None:
            return session
    try:
        return ort.InferenceSession(str(path), options(), providers=[cpu])
    except Exception as exc:  # noqa: BLE001 - reported as the bundle's fault, in one line
        raise BundleError(f"{path}: onnxruntime cannot load the graph ({first_line(exc)})") from None


def _builtin_session(path: Path, entry: ProviderSpec,
                     options: Callable[[], ort.SessionOptions]) -> ort.InferenceSession | None:
    name = _name(entry)
    if not isinstance(entry, str):
        folder = str(Path(ort.__file__).parent / "capi")  # where onnxruntime's own provider wheels put libraries
        entry = (name, {k: str(v).replace("{package}", folder) for k, v in entry[1].items() if k != "devices"})
    try:
        session = ort.InferenceSession(str(path), options(), providers=[entry, CPU])
    except Exception as exc:  # noqa: BLE001 - any failure means: try the next provider
        log.warning("provider %s failed to open %s (%s); trying the next", name, path.name, first_line(exc))
        return None
    if name in session.get_providers():
        return session
    log.warning("provider %s was not applied to %s; trying the next", name, path.name)
    return None


def _plugin_session(path: Path, name: str, options: dict[str, Any],
                    session: Callable[[], ort.SessionOptions]) -> ort.InferenceSession | None:
    """`name` from its plugin package, on the first of its devices that opens the graph.

    Option values may say `{package}` for the folder of the provider's libraries (QNN's
    `backend_path = "{package}/libQnnHtp.so"`): the plugin package's here, onnxruntime's
    own for a built-in provider."""
    package, extra = PLUGINS[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        log.warning('provider %s is a plugin and its package %s is not installed (pip install "edgellm[%s]"); '
                    "trying the next", name, package, extra)
        return None
    if name not in _registered:
        try:
            ort.register_execution_provider_library(name, module.get_library_path())
        except Exception as exc:  # noqa: BLE001 - a broken plugin is one more provider to skip
            log.warning("provider %s: cannot register %s (%s); trying the next", name, package, first_line(exc))
            return None
        _registered.add(name)
    options = {k: str(v) for k, v in options.items()}
    order = [kind.strip().upper() for kind in options.pop("devices", DEVICE_ORDER).split(",") if kind.strip()]
    folder = str(Path(module.__file__).parent)
    options = {k: v.replace("{package}", folder) for k, v in options.items()}
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:
        log.warning("provider %s offers no device on this machine; trying the next", name)
        return None
    for kind in order:
        chosen = [d for d in devices if d.device.type.name == kind]
        if not chosen:
            continue
        so = session()
        try:
            so.add_provider_for_devices(chosen[:1], options)
            return ort.InferenceSession(str(path), so)
        except Exception as exc:  # noqa: BLE001 - try the next device
            log.warning("provider %s on its %s device failed to open %s (%s); trying the next", name, kind,
                        path.name, first_line(exc))
    have = sorted({d.device.type.name for d in devices})
    log.warning("provider %s opened %s on none of its devices %s (has %s); trying the next", name, path.name,
                ",".join(order), ",".join(have))
    return None


def available_devices() -> list[tuple[str, str, str]]:
    """(provider, device type, vendor) for every provider this machine can run: onnxruntime's
    own and those of installed plugin packages (registered here). The device is "" for a
    built-in provider that does not enumerate devices and for a plugin that found none."""
    for name, (package, _) in PLUGINS.items():
        if name in _registered:
            continue
        try:
            module = importlib.import_module(package)
            ort.register_execution_provider_library(name, module.get_library_path())
            _registered.add(name)
        except Exception:  # noqa: BLE001 - not installed or broken: not available here
            continue
    found = [(d.ep_name, d.device.type.name, d.device.vendor) for d in ort.get_ep_devices()]
    listed = {name for name, _, _ in found}
    idle = [(name, "", "installed, no device here") for name in sorted(_registered - listed)]
    # Azure's provider calls a cloud endpoint: never a device of an offline board.
    return found + idle + [(p, "", "") for p in ort.get_available_providers()
                           if p not in listed and p != "AzureExecutionProvider"]

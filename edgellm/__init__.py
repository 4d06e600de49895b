"""edgellm: small open language models on edge boards, served over MQTT.

The runtime imports nothing heavier than onnxruntime, numpy, tokenizers, jinja2
and paho-mqtt.
"""
from __future__ import annotations

__version__ = "0.1.0"

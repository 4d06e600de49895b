"""edgellm's export toolchain: open model (HF folder or GGUF) -> bundle.

Heavy dependencies (onnx, gguf, and for the generic path torch/transformers/optimum)
live here only; the runtime package never imports this one.
"""

"""A minimal driver for the fast graph: one preallocated KV buffer per tensor, IO binding.

The same OrtValue is bound as `past_key_values.{i}.*` and `present.{i}.*`, which is
how the runtime runs the graph: GroupQueryAttention appends in place.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgellm.runtime.model_spec import ModelSpec


class FastGraphRunner:
    def __init__(self, model: Path, spec: ModelSpec, max_seq: int = 128) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.spec = spec
        shape = (1, spec.num_kv_heads, max_seq, spec.head_dim)
        # The numpy arrays back the OrtValues and must outlive them.
        self._buffers = [np.zeros(shape, dtype=np.float32) for _ in range(2 * spec.num_layers)]
        self.kv = [ort.OrtValue.ortvalue_from_numpy(b) for b in self._buffers]
        self.length = 0

    def step(self, ids: list[int], keep: int = 1) -> np.ndarray:
        """Feed `ids` after what was fed so far; logits [keep, vocab] of the last `keep` positions."""
        io = self.session.io_binding()
        feeds = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, self.length + len(ids)), dtype=np.int64),
            "logits_to_keep": np.array([keep], dtype=np.int64),
        }
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output("logits")
        for i in range(self.spec.num_layers):
            for j, kind in enumerate(("key", "value")):
                buf = self.kv[2 * i + j]
                io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
        self.session.run_with_iobinding(io)
        self.length += len(ids)
        return io.get_outputs()[0].numpy()[0]

    def greedy(self, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
        """Greedy continuation of `prompt`: new tokens and the logits each was chosen from."""
        logits = [self.step(prompt)[-1]]
        tokens = [int(np.argmax(logits[-1]))]
        for _ in range(steps - 1):
            logits.append(self.step([tokens[-1]])[-1])
            tokens.append(int(np.argmax(logits[-1])))
        return tokens, logits

    def teacher_forced(self, prompt: list[int], continuation: list[int]) -> list[np.ndarray]:
        """Logits predicting each token of `continuation`, decoding one token at a time."""
        logits = [self.step(prompt)[-1]]
        for token in continuation[:-1]:
            logits.append(self.step([token])[-1])
        return logits

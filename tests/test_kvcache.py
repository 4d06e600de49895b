"""KV caches against one-op graphs and a numpy reference, no exported model needed.

The static cache runs a lone GroupQueryAttention sharing past and present, the
way the fast graph does; the dynamic cache runs a Concat, the way an optimum
graph grows its present.
"""
from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgellm.errors import GenerationError
from edgellm.runtime.caches import DynamicCache, StaticCache

HEADS, KV_HEADS, HEAD_DIM, CAPACITY = 4, 2, 8, 24


def _session(nodes, inputs, outputs) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _kv_io(layer: int) -> tuple[list, list]:
    shape = [1, KV_HEADS, "past", HEAD_DIM]
    ins = [helper.make_tensor_value_info(f"past_key_values.{layer}.{n}", TensorProto.FLOAT, shape)
           for n in ("key", "value")]
    outs = [helper.make_tensor_value_info(f"present.{layer}.{n}", TensorProto.FLOAT, [1, KV_HEADS, "total", HEAD_DIM])
            for n in ("key", "value")]
    return ins, outs


@pytest.fixture(scope="module")
def gqa() -> ort.InferenceSession:
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_key_values.0.key", "past_key_values.0.value", "seqlens_k", "total"],
        ["out", "present.0.key", "present.0.value"],
        domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS,
    )
    kv_in, kv_out = _kv_io(0)
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("q", f, [1, "s", HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("k", f, [1, "s", KV_HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("v", f, [1, "s", KV_HEADS * HEAD_DIM]),
        *kv_in,
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    return _session([node], inputs, [helper.make_tensor_value_info("out", f, [1, "s", HEADS * HEAD_DIM]), *kv_out])


def _qkv(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((1, n, h * HEAD_DIM), dtype=np.float32) for h in (HEADS, KV_HEADS, KV_HEADS))


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal grouped-query attention over a whole sequence, the plain way."""
    n = q.shape[1]
    q, k, v = q.reshape(n, HEADS, HEAD_DIM), k.reshape(n, KV_HEADS, HEAD_DIM), v.reshape(n, KV_HEADS, HEAD_DIM)
    out = np.empty_like(q)
    causal = np.triu(np.full((n, n), -np.inf, np.float32), 1)
    for h in range(HEADS):
        g = h // (HEADS // KV_HEADS)
        scores = q[:, h] @ k[:, g].T / np.sqrt(HEAD_DIM) + causal
        p = np.exp(scores - scores.max(1, keepdims=True))
        out[:, h] = (p / p.sum(1, keepdims=True)) @ v[:, g]
    return out.reshape(1, n, HEADS * HEAD_DIM)


def _feed(session: ort.InferenceSession, cache: StaticCache, io: ort.IOBinding, q, k, v) -> np.ndarray:
    """One step the way the runtime does it: the cache binds itself, the step feeds `n` rows."""
    n = q.shape[1]
    total = cache.length + n
    cache.bind(io, n)
    feeds = dict(q=q, k=k, v=v, seqlens_k=np.array([total - 1], np.int32), total=np.array(total, np.int32))
    for name, array in feeds.items():
        io.bind_cpu_input(name, np.ascontiguousarray(array))
    io.bind_output("out", "cpu")
    session.run_with_iobinding(io)
    cache.advance(n)
    return io.copy_outputs_to_cpu()[-1]


@pytest.mark.parametrize("chunks", [[10], [1] * 10, [4, 1, 5], [6, 4]])
def test_static_cache_any_chunking_matches_reference(gqa, chunks):
    q, k, v = _qkv(10, seed=0)
    cache = StaticCache(1, KV_HEADS, HEAD_DIM, CAPACITY)
    io = gqa.io_binding()
    outs, at = [], 0
    for n in chunks:
        outs.append(_feed(gqa, cache, io, q[:, at : at + n], k[:, at : at + n], v[:, at : at + n]))
        at += n
    np.testing.assert_allclose(np.concatenate(outs, axis=1), _attention(q, k, v), atol=1e-5)
    assert cache.length == 10
    # The graph wrote the keys straight into the cache's own buffer: no copy per step.
    np.testing.assert_array_equal(cache.keys[0][0, :, :10], k[0].reshape(10, KV_HEADS, HEAD_DIM).transpose(1, 0, 2))


def test_static_rewind_then_diverge_matches_cold_run(gqa):
    q, k, v = _qkv(10, seed=1)
    q2, k2, v2 = _qkv(10, seed=2)
    # A second sequence sharing the first 6 positions, then different.
    q2[:, :6], k2[:, :6], v2[:, :6] = q[:, :6], k[:, :6], v[:, :6]
    cache = StaticCache(1, KV_HEADS, HEAD_DIM, CAPACITY)
    io = gqa.io_binding()
    _feed(gqa, cache, io, q, k, v)
    cache.rewind(6)
    tail = _feed(gqa, cache, io, q2[:, 6:], k2[:, 6:], v2[:, 6:])
    np.testing.assert_allclose(tail, _attention(q2, k2, v2)[:, 6:], atol=1e-5)
    assert cache.trim(3) == 3 and cache.length == 7
    assert cache.trim(100) == 7 and cache.length == 0


def test_static_snapshot_restore_survives_overwrite(gqa):
    q, k, v = _qkv(8, seed=3)
    cache = StaticCache(1, KV_HEADS, HEAD_DIM, CAPACITY)
    io = gqa.io_binding()
    _feed(gqa, cache, io, q[:, :5], k[:, :5], v[:, :5])
    snap = cache.snapshot(5)
    cache.rewind(0)
    qx, kx, vx = _qkv(8, seed=4)
    _feed(gqa, cache, io, qx, kx, vx)  # overwrites rows 0..7
    cache.restore(snap)
    assert cache.length == 5
    rest = _feed(gqa, cache, io, q[:, 5:], k[:, 5:], v[:, 5:])
    np.testing.assert_allclose(rest, _attention(q, k, v)[:, 5:], atol=1e-5)


def test_static_cache_refuses_overflow_and_bad_rewind(gqa):
    cache = StaticCache(1, KV_HEADS, HEAD_DIM, 4)
    io = gqa.io_binding()
    q, k, v = _qkv(5, seed=5)
    with pytest.raises(GenerationError, match="holds 0 of 4 tokens; cannot add 5"):
        _feed(gqa, cache, io, q, k, v)
    with pytest.raises(GenerationError, match="cannot rewind KV cache of length 0 to 2"):
        cache.rewind(2)


@pytest.fixture(scope="module")
def concat() -> ort.InferenceSession:
    """present = past ++ new rows, per layer, like an optimum decoder."""
    nodes, outputs = [], []
    inputs = [helper.make_tensor_value_info("new", TensorProto.FLOAT, [1, KV_HEADS, "s", HEAD_DIM])]
    for layer in range(2):
        kv_in, kv_out = _kv_io(layer)
        inputs += kv_in
        outputs += kv_out
        for src, dst in zip(kv_in, kv_out):
            nodes.append(helper.make_node("Concat", [src.name, "new"], [dst.name], axis=2))
    return _session(nodes, inputs, outputs)


def _rows(start: int, n: int) -> np.ndarray:
    """Rows whose values say their position, so any misplaced row shows."""
    pos = np.arange(start, start + n, dtype=np.float32)
    return np.broadcast_to(pos[None, None, :, None], (1, KV_HEADS, n, HEAD_DIM)).copy()


def _grow(session: ort.InferenceSession, cache: DynamicCache, io: ort.IOBinding, n: int) -> None:
    cache.bind(io, n)
    io.bind_cpu_input("new", _rows(cache.length, n))
    session.run_with_iobinding(io)
    cache.advance(n)


def test_dynamic_cache_grows_rewinds_and_restores(concat):
    cache = DynamicCache(2, KV_HEADS, HEAD_DIM, CAPACITY)
    io = concat.io_binding()
    for n in (5, 1, 1):
        _grow(concat, cache, io, n)
    assert cache.length == 7
    for layer in range(2):
        np.testing.assert_array_equal(cache.keys[layer], _rows(0, 7))
        np.testing.assert_array_equal(cache.values[layer], _rows(0, 7))
    snap = cache.snapshot(4)
    cache.rewind(3)
    assert cache.keys[0].flags.c_contiguous
    _grow(concat, cache, io, 2)
    np.testing.assert_array_equal(cache.keys[1], _rows(0, 5))
    cache.restore(snap)
    _grow(concat, cache, io, 1)
    np.testing.assert_array_equal(cache.values[0], _rows(0, 5))
    with pytest.raises(GenerationError, match="cannot add 20"):
        cache.bind(io, 20)


def test_dynamic_advance_without_bind_is_refused():
    cache = DynamicCache(1, KV_HEADS, HEAD_DIM, CAPACITY)
    with pytest.raises(GenerationError, match="without a matching bind"):
        cache.advance(1)


def test_unknown_kv_dtype_is_refused():
    with pytest.raises(GenerationError, match="graph.kv_dtype 'int4'"):
        StaticCache(1, KV_HEADS, HEAD_DIM, CAPACITY, "int4")


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS:")).split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_preallocated_cache_is_resident_only_where_written(gqa):
    """SmolLM2's shape at 4,096 tokens is 189 MB of buffers; only written rows may cost memory."""
    before = _rss_mb()
    cache = StaticCache(30, 3, 64, 4096)
    allocated = _rss_mb() - before
    full = 30 * 2 * 3 * 4096 * 64 * 4 / 2**20
    assert allocated < full / 10, f"{allocated:.0f} MB resident for an empty {full:.0f} MB cache"
    for k, v in zip(cache.keys, cache.values):
        k[:, :, :64] = 1.0
        v[:, :, :64] = 1.0
    assert _rss_mb() - before < full / 10

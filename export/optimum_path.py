"""The generic export path: any decoder optimum-onnx supports -> one ONNX graph with a KV cache.

It exists for architectures the fast builder does not cover, so it trusts optimum for the
graph and only fixes what matters on an edge board: the tied lm_head is stored as its own
weight (so it is quantized like every other projection) and weights get the requested dtype.
torch, transformers and optimum are imported inside the functions: `import export` stays light.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgellm.errors import ExportError

from .config import GraphInfo, QuantConfig

TASK = "text-generation-with-past"
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

Progress = Callable[[str, int, int], None]


def export_optimum(
    source_dir: Path, out_dir: Path, quant: QuantConfig, progress: Progress | None = None
) -> GraphInfo:
    """Export the HF folder `source_dir` through optimum and write `out_dir/model.onnx` (+ .data)."""
    progress = progress or (lambda stage, done, total: None)
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    model_type = _model_type(source_dir)
    main_export = _optimum_exporter()
    _check_supported(source_dir, model_type)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress("export", 0, 1)
    # The scratch copy lives beside the output: a 1B model's fp32 graph may not fit in /tmp.
    with tempfile.TemporaryDirectory(prefix=".optimum-", dir=out_dir) as scratch:
        _run_optimum(main_export, source_dir, Path(scratch))
        model = onnx.load(Path(scratch) / GRAPH_FILE)
    progress("export", 1, 1)
    return write_graph(model, out_dir, quant, progress)


def write_graph(
    model: onnx.ModelProto, out_dir: Path, quant: QuantConfig, progress: Progress | None = None
) -> GraphInfo:
    """Untie, convert the weights to `quant` and save an optimum graph as the bundle's model."""
    progress = progress or (lambda stage, done, total: None)
    notes = [f"optimum-onnx export ({TASK})"]
    untied = untie_transposed_weights(model.graph)
    if untied:
        notes.append(f"stored transposed shared weights as their own MatMul weights: {', '.join(untied)}")
    progress("quantize", 0, 1)
    if quant.weights in ("int4", "int8"):
        count = quantize_matmuls(model, quant)
        notes.append(
            f"{count} MatMul weights {quant.weights} (MatMulNBits, block {quant.block_size}, "
            f"{'symmetric' if quant.symmetric else 'asymmetric'}); embedding float32"
        )
    elif quant.weights == "fp16":
        count = store_weights_fp16(model.graph)
        notes.append(f"{count} weights stored float16, cast to float32 at load; compute float32")
    progress("quantize", 1, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / GRAPH_FILE, out_dir / DATA_FILE):
        stale.unlink(missing_ok=True)  # external data is appended to, never truncated
    onnx.save_model(
        model,
        out_dir / GRAPH_FILE,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
    )
    # onnx creates the data file owner-only; a bundle is read by whoever serves it.
    data = out_dir / DATA_FILE
    if data.exists():
        data.chmod((out_dir / GRAPH_FILE).stat().st_mode & 0o777)
    graph = model.graph
    return GraphInfo(
        kind="generic",
        file=GRAPH_FILE,
        inputs=[i.name for i in graph.input],
        outputs=[o.name for o in graph.output],
        kv_dtype="float32",
        notes=notes,
    )


def untie_transposed_weights(graph: onnx.GraphProto) -> list[str]:
    """Replace MatMul(x, Transpose(W)) with MatMul(x, W') where W' is a real initializer.

    optimum (when accelerate is installed) ties lm_head to the embedding by transposing the
    embedding at run time; the quantizer only handles constant MatMul weights, so it would
    leave the largest projection of a small model in float32. Returns the MatMuls rewritten.
    """
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    rewritten = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
            continue
        name = f"{transpose.input[0]}.transposed"
        if name not in inits:
            weight = numpy_helper.to_array(inits[transpose.input[0]])
            perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), name)
            graph.initializer.append(inits[name])
        node.input[1] = name
        rewritten.append(node.name or node.output[0])
    if rewritten:
        _drop_dead_nodes(graph)
    return rewritten


def store_weights_fp16(graph: onnx.GraphProto) -> int:
    """Store float32 weight matrices as float16 with a Cast back, halving the file.

    Compute stays float32 because onnxruntime's CPU kernels for float16 are few and slow.
    """
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2:
            continue
        name, half = init.name, f"{init.name}.fp16"
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), half))
        casts.append(helper.make_node("Cast", [half], [name], name=f"{name}.cast", to=onnx.TensorProto.FLOAT))
    # Nodes must stay topologically sorted: the casts depend only on initializers, so go first.
    nodes = casts + list(graph.node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    return len(casts)


def op_histogram(model: onnx.ModelProto) -> Counter[str]:
    """Op counts of the main graph, for the export log and tests."""
    return Counter(node.op_type for node in model.graph.node)


def quantize_matmuls(model: onnx.ModelProto, quant: QuantConfig) -> int:
    """Replace every MatMul with a constant 2-D float weight by MatMulNBits; returns how many.

    onnxruntime's MatMulNBitsQuantizer would do the same but needs onnx_ir; export/quantize.py
    calls the same onnxruntime block quantizer, so the codes are identical.
    """
    bits = 4 if quant.weights == "int4" else 8
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, quantized = [], {}
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        k, n = weight.dims
        if weight.name not in quantized:
            quantized[weight.name] = _add_quantized(graph, weight, bits, quant)
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], *quantized[weight.name]],
                list(node.output),
                name=f"{node.name}_Q{bits}",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=quant.block_size,
                accuracy_level=quant.accuracy_level,
            )
        )
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_dead_nodes(graph)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(quantized)


def _add_quantized(
    graph: onnx.GraphProto, weight: onnx.TensorProto, bits: int, quant: QuantConfig
) -> list[str]:
    """Quantize a [K, N] MatMul weight into new initializers; returns MatMulNBits' weight inputs."""
    from .quantize import quantize_nbits

    q = quantize_nbits(numpy_helper.to_array(weight).T, bits, quant.block_size, quant.symmetric)
    prefix = f"{weight.name}.q{bits}"
    tensors = {f"{prefix}.weight": q.packed, f"{prefix}.scales": q.scales}
    if q.zero_points is not None:
        tensors[f"{prefix}.zero_points"] = q.zero_points
    graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in tensors.items())
    return list(tensors)


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads, and initializers no node reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        graph.ClearField("node")
        graph.node.extend(keep)
    used = {name for node in graph.node for name in node.input} | outputs
    keep_inits = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep_inits)


def _model_type(source_dir: Path) -> str:
    config = source_dir / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise ExportError(f"{config}: missing (the optimum path needs a Hugging Face model folder)") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{config}: unreadable ({exc})") from None
    if not isinstance(model_type, str):
        raise ExportError(f"{config}: no model_type")
    return model_type


def _optimum_exporter() -> Callable[..., object]:
    try:
        from optimum.exporters.onnx import main_export
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("optimum", "torch", "transformers"):
            raise ExportError("the optimum path needs `pip install edgellm[optimum]`") from None
        raise ExportError(f"optimum-onnx cannot be imported: {exc}") from exc
    except ImportError as exc:
        # Typically a transformers newer than optimum-onnx supports (0.1 pins transformers<4.58).
        raise ExportError(f"optimum-onnx cannot be imported (check transformers' version): {exc}") from exc
    return main_export


def _check_supported(source_dir: Path, model_type: str) -> None:
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(
            model_type, "onnx", library_name="transformers"
        )
    except KeyError:
        raise ExportError(
            f"{source_dir}: architecture {model_type!r} is not supported by optimum's ONNX export"
        ) from None
    if TASK not in tasks:
        raise ExportError(
            f"{source_dir}: optimum cannot export {model_type!r} as a decoder with a KV cache ({TASK})"
        )


def _run_optimum(main_export: Callable[..., object], source_dir: Path, scratch: Path) -> None:
    with warnings.catch_warnings():
        # torch's tracer warns about every data-dependent branch in transformers: noise for a user.
        warnings.simplefilter("ignore")
        try:
            main_export(
                str(source_dir),
                output=scratch,
                task=TASK,
                dtype="fp32",
                device="cpu",
                library_name="transformers",
                local_files_only=True,
                do_validation=False,
            )
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"{source_dir}: optimum export failed: {first}") from exc
    if not (scratch / GRAPH_FILE).is_file():
        raise ExportError(f"{source_dir}: optimum export wrote no {GRAPH_FILE}")

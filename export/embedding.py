"""Encoder embedding models (BERT-class sentence encoders) -> a bundle of kind `embedding`.

The graph takes token ids and the attention mask and returns one pooled (and, as the source's
sentence-transformers config says, L2-normalised) vector per text, so the runtime only tokenizes
and runs it. It is traced with torch.onnx (encoders are short, fixed stacks: no KV cache, nothing
the fast builder's decoder blocks add), and int8 weights are the generic path's MatMulNBits
blocks. The quality gate is cosine agreement with the source model in torch on the
evaluation text. torch and transformers are imported inside the functions (export-time only).
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgellm.errors import ExportError
from edgellm.runtime.bundle import Manifest, finalize_manifest
from edgellm.runtime.model_spec import ModelSpec

from .config import QuantConfig
from .quality import DEFAULT_TEXT

# Hugging Face model types traced as sentence encoders (what AutoModel loads without a head).
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra")
WEIGHTS = ("int8", "fp32")
# Least cosine similarity to the source, over every evaluation sentence, a bundle must keep.
MIN_COSINE = {"fp32": 0.999, "int8": 0.99}
GRAPH_FILE = "model.onnx"
MAX_EVAL_TEXTS = 64

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Pooling:
    """How token vectors become one: sentence-transformers' Pooling and Normalize modules."""

    mode: str  # "mean" or "cls"
    normalize: bool
    max_tokens: int  # texts are truncated to this many tokens (sentence_bert_config.json)


def is_encoder(path: Path) -> bool:
    """A Hugging Face folder whose config names an encoder model type."""
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") in ENCODER_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def read_pooling(folder: Path, max_positions: int) -> Pooling:
    """The pooling and normalisation the folder's sentence-transformers config declares; a bare
    transformer folder gets mean pooling and normalised vectors (what cosine search expects)."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return Pooling("mean", True, min(max_positions, 512))
    modules = _json(modules_file)
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    pooling_dir = next((m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    mode = "mean"
    if pooling_dir is not None:
        config = _json(folder / pooling_dir / "config.json")
        modes = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
        if modes == ["pooling_mode_cls_token"]:
            mode = "cls"
        elif modes != ["pooling_mode_mean_tokens"]:
            raise ExportError(f"{folder / pooling_dir}: pooling {modes} is not supported (mean or cls tokens)")
    unknown = set(types) - {"Transformer", "Pooling", "Normalize"}
    if unknown:
        raise ExportError(f"{modules_file}: modules {sorted(unknown)} are not supported "
                          f"(Transformer, Pooling, Normalize)")
    max_tokens = max_positions
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_tokens = int(_json(st_config).get("max_seq_length") or max_positions)
    return Pooling(mode, "Normalize" in types, min(max_tokens, max_positions))


def eval_texts(text: str | None) -> list[str]:
    """The gate's sentences: the evaluation text split at sentence ends (one vector each)."""
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", text or DEFAULT_TEXT)]
    texts = [p for p in parts if p][:MAX_EVAL_TEXTS]
    if not texts:
        raise ExportError("evaluation text holds no sentence")
    return texts


def export_embedding(source: Path, tmp: Path, *, quant: QuantConfig, name: str, eval_text: str | None,
                     evaluate: bool, allow_quality_loss: bool, progress: Progress) -> Manifest:
    """Write the embedding bundle's files into `tmp` (the bundle writer's directory)."""
    weights = quant.weights
    if weights not in WEIGHTS:
        raise ExportError(f"--quant {weights}: an embedding bundle's weights are int8 or fp32 (--quant int8|fp32)")
    torch, transformers = _torch()
    progress("read", 0, 1)
    config = _json(source / "config.json")
    model = transformers.AutoModel.from_pretrained(source, dtype=torch.float32).eval()
    pooling = read_pooling(source, int(config.get("max_position_embeddings", 512)))
    tokenizer_json = _tokenizer_json(source, pooling.max_tokens)
    takes_types = "token_type_ids" in model.forward.__code__.co_varnames
    progress("read", 1, 1)
    progress("export", 0, 1)
    fp32 = tmp / (GRAPH_FILE if weights == "fp32" else ".fp32.onnx")
    inputs = _trace(torch, model, pooling, takes_types, fp32)
    notes = []
    if weights == "int8":
        count, table = _quantize(fp32, tmp / GRAPH_FILE, quant, int(config["vocab_size"]))
        notes.append(f"{count} MatMul weights int8 (MatMulNBits, block {quant.block_size}, accuracy level "
                     f"{quant.accuracy_level}); token table {'int8 rows, block ' + str(quant.block_size) if table else 'float32'}"
                     f"; norms, position embeddings and attention float32")
    progress("export", 1, 1)
    (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    manifest = Manifest(
        name=name,
        spec=ModelSpec(arch=config["model_type"], num_layers=int(config["num_hidden_layers"]), hidden_size=hidden,
                       intermediate_size=int(config.get("intermediate_size", 4 * hidden)), num_heads=heads,
                       num_kv_heads=heads, head_dim=hidden // heads, vocab_size=int(config["vocab_size"]),
                       max_context=pooling.max_tokens, activation="gelu"),
        graph={"kind": "embedding", "file": GRAPH_FILE, "inputs": inputs, "outputs": ["embeddings"],
               "pooling": pooling.mode, "normalize": pooling.normalize, "dimensions": hidden},
        quantization={**{k: v for k, v in quant.to_dict().items() if k != "kv_cache"}, "notes": notes},
        generation={"pad_token_id": config.get("pad_token_id", 0)},
        source={"kind": "hf", "path": str(source)},
        exporter={"path": "embedding", "torch": torch.__version__, "transformers": transformers.__version__},
    )
    if evaluate:
        progress("evaluate", 0, 1)
        manifest.quality = _gate(torch, model, pooling, tmp, inputs, eval_texts(eval_text), weights, bool(eval_text))
        progress("evaluate", 1, 1)
        if not manifest.quality["passed"] and not allow_quality_loss:
            q = manifest.quality
            raise ExportError(f"least cosine similarity to the source {q['min_cosine']:.5f} is under "
                              f"{q['limit']} on the evaluation text; not written (--quant fp32 keeps the "
                              f"source's weights, --allow-quality-loss writes it anyway)")
    finalize_manifest(tmp, manifest)
    return manifest


def _torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ExportError(f"exporting an embedding model needs torch and transformers ({exc.name} is missing): "
                          f"pip install 'edgellm[optimum]'") from None
    return torch, transformers


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read ({exc})") from None


def _tokenizer_json(source: Path, max_tokens: int) -> str:
    """The fast tokenizer, truncating at `max_tokens` and padding a batch to its longest text."""
    from tokenizers import Tokenizer

    path = source / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{source}: no tokenizer.json (a fast tokenizer is needed; save one with transformers' "
                          f"AutoTokenizer.from_pretrained(...).save_pretrained)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_tokens)
    pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else 0
    pad = tokenizer.id_to_token(pad_id) or "[PAD]"
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad)
    return tokenizer.to_str()


def _pooled(torch: Any, model: Any, pooling: Pooling) -> Any:
    """The source model with the bundle's pooling on top, as a torch module (traced and the gate's reference)."""
    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            if pooling.mode == "cls":
                out = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(out, p=2, dim=1) if pooling.normalize else out

    return Pooled().eval()


def _trace(torch: Any, model: Any, pooling: Pooling, takes_types: bool, out: Path) -> list[str]:
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_types else [])
    example = tuple(torch.ones((2, 8), dtype=torch.int64) for _ in names)
    axes = {name: {0: "batch", 1: "tokens"} for name in names} | {"embeddings": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on constants, which hold for any batch
        try:
            torch.onnx.export(_pooled(torch, model, pooling), example, str(out), input_names=names,
                              output_names=["embeddings"], dynamic_axes=axes, opset_version=17, dynamo=False)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds; the user needs the one line
            raise ExportError(f"tracing the encoder failed: {type(exc).__name__}: {str(exc)[:300]}") from None
    return names


def _quantize(fp32: Path, out: Path, quant: QuantConfig, vocab_size: int) -> tuple[int, bool]:
    """The traced graph's MatMul weights as int8 blocks (the generic path's rewrite) and its token
    table as int8 rows (`_quantize_table`), fp32 file removed: (MatMuls rewritten, table rewritten)."""
    import onnx

    from .optimum_path import quantize_matmuls

    model = onnx.load(fp32)
    count = quantize_matmuls(model, quant)
    table = _quantize_table(model.graph, vocab_size, quant.block_size)
    onnx.save_model(model, out)
    fp32.unlink()
    return count, table


def _quantize_table(graph: Any, vocab_size: int, block_size: int) -> bool:
    """The token table's Gather (the largest weight of a small encoder: 47 of MiniLM's 90 MB) as
    symmetric int8 blocks along each row, dequantized after the gather: only the rows a text
    uses are ever widened. False where the table is not there or its width is not whole blocks."""
    from onnx import TensorProto, helper, numpy_helper

    from .quantize import quantize_nbits

    inits = {t.name: t for t in graph.initializer}
    node = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                 and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].dims[0] == vocab_size), None)
    if node is None or inits[node.input[0]].dims[1] % block_size:
        return False
    table = inits[node.input[0]]
    hidden = table.dims[1]
    q = quantize_nbits(numpy_helper.to_array(table), 8, block_size, symmetric=True)  # codes around 128
    name = table.name
    graph.initializer.extend([numpy_helper.from_array(q.packed, f"{name}.q8"),
                              numpy_helper.from_array(q.scales, f"{name}.scales"),
                              numpy_helper.from_array(np.array(128, np.float32), f"{name}.zero"),
                              numpy_helper.from_array(np.array([0, 0, hidden], np.int64), f"{name}.shape"),
                              numpy_helper.from_array(np.array([-1], np.int64), f"{name}.last")])
    ids, out = node.input[1], node.output[0]
    rows = [helper.make_node("Gather", [f"{name}.q8", ids], [f"{out}.codes"]),
            helper.make_node("Cast", [f"{out}.codes"], [f"{out}.float"], to=TensorProto.FLOAT),
            helper.make_node("Sub", [f"{out}.float", f"{name}.zero"], [f"{out}.centred"]),
            helper.make_node("Gather", [f"{name}.scales", ids], [f"{out}.scales"]),
            helper.make_node("Unsqueeze", [f"{out}.scales", f"{name}.last"], [f"{out}.scales1"]),
            helper.make_node("Mul", [f"{out}.centred", f"{out}.scales1"], [f"{out}.blocks"]),
            helper.make_node("Reshape", [f"{out}.blocks", f"{name}.shape"], [out])]
    at = list(graph.node).index(node)
    nodes = [*graph.node[:at], *rows, *graph.node[at + 1:]]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.remove(table)
    return True


def _gate(torch: Any, model: Any, pooling: Pooling, bundle: Path, inputs: list[str], texts: list[str],
          weights: str, custom: bool) -> dict[str, Any]:
    """Cosine similarity of every evaluation sentence's bundle vector to the source's (torch)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    encoded = tokenizer.encode_batch(texts)
    feeds = {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
             "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
             "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64)}
    session = ort.InferenceSession(str(bundle / GRAPH_FILE), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: feeds[name] for name in inputs})[0]
    with torch.no_grad():
        want = _pooled(torch, model, pooling)(*(torch.from_numpy(feeds[name]) for name in inputs)).numpy()
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12)
    return {"text": "custom" if custom else "builtin", "texts": len(texts), "min_cosine": round(float(cos.min()), 6),
            "mean_cosine": round(float(cos.mean()), 6), "limit": MIN_COSINE[weights],
            "passed": bool(cos.min() >= MIN_COSINE[weights])}

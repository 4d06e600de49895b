"""edgellm, onnxruntime-genai and llama.cpp at the shapes users deploy (random weights, real shapes).

    python benchmarks/deploy_shapes.py [--shapes qwen2.5-0.5b,llama-3.2-1b,gemma-3-1b] [--runs 3]
        [--tokens 128] [--prompt 64] [--threads 2] [--engines edgellm,genai,llamacpp]
        [--work DIR] [--skip-export] [--json out.json]

A decode step's cost depends on the shapes, not on the values, so random weights of
Qwen2.5-0.5B's exact dimensions time like the real model (their answers mean nothing:
quality is measured on SmolLM2 and real files elsewhere). Per shape, built once and
cached under --work: the HF folder (transformers from the published config, seeded
weights, a synthetic byte-level tokenizer), its F16 GGUF (tests/gguf_writer.py: llama.cpp's
converter's names, q/k permutation and norm offsets), Q4_0 and Q4_K_M GGUFs from it by
llama.cpp's own quantizer, and onnxruntime-genai's int4 build of the HF folder. edgellm
exports each source afresh (`--no-eval`: a perplexity gate on random weights means
nothing). Every engine then runs in a process of its own (worker.py), one process per
engine per round, rounds interleaved, on the same token ids with EOS ignored.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))  # tiny, gguf_writer: the tests' model and GGUF writers

import report  # noqa: E402
from bench import build_genai, run_measured  # noqa: E402

WORKER = HERE / "worker.py"
PI5_BYTES_PER_S = 11e9  # what a Raspberry Pi 5 sustains reading memory (issue 20)
UNSTABLE = 1.3  # one row's rounds decoding further apart than this: a busy machine (as in report.unstable)
GGUF_TYPES = ("Q4_0", "Q4_K_M")  # llama.cpp's quantizer writes these the way users download them
SOURCES = (*(f"GGUF {t}" for t in GGUF_TYPES), "HF")
ENGINES = ("edgellm", "genai", "llamacpp")
MODULES = {"edgellm": "edgellm", "genai": "onnxruntime_genai", "llamacpp": "llama_cpp"}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # at the end of every synthetic vocabulary
# A fixed prompt of plain ASCII without double spaces: each byte is one token of the synthetic
# vocabulary (its ids 0-255 are the bytes), so every engine gets the same ids whatever its tokenizer.
PROMPT_TEXT = ("The greenhouse controller reads soil moisture every ten minutes and opens the valves "
               "when it drops. A gateway in the barn forwards temperature readings over one radio link.")


@dataclass(frozen=True)
class Shape:
    """A model's config.json fields as published (token ids aside: the synthetic vocabulary's)."""

    name: str
    config: dict[str, Any]
    origin: str


# Published config.json values (Hugging Face hub, December 2024): the dimensions, tying and rope
# settings are exact; rope_scaling null is written as {"rope_type": "default"}, its meaning, because
# onnxruntime-genai's builder iterates it; bos/eos/pad point at SPECIALS instead of the real ids.
SHAPES = {
    "qwen2.5-0.5b": Shape("qwen2.5-0.5b", dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        tie_word_embeddings=True, rope_theta=1000000.0, rope_scaling={"rope_type": "default"},
        max_position_embeddings=32768, rms_norm_eps=1e-06, hidden_act="silu", use_sliding_window=False,
        sliding_window=32768, max_window_layers=21,
    ), "Qwen/Qwen2.5-0.5B-Instruct config.json"),
    "llama-3.2-1b": Shape("llama-3.2-1b", dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-05,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192},
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    ), "meta-llama/Llama-3.2-1B-Instruct config.json"),
    "gemma-3-1b": Shape("gemma-3-1b", dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=1152, intermediate_size=6912,
        num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
        tie_word_embeddings=True, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "default"}, max_position_embeddings=32768, rms_norm_eps=1e-06,
        query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None, attn_logit_softcapping=None,
    ), "google/gemma-3-1b-it config.json"),
    # Not a real shape: the smoke test's, built in a second (rows of 256 so K-quants apply).
    "tiny": Shape("tiny", dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512,
        tie_word_embeddings=True, rope_theta=10000.0, rope_scaling={"rope_type": "default"},
        max_position_embeddings=512, rms_norm_eps=1e-05,
    ), "tests only"),
}
DEFAULT_SHAPES = ("qwen2.5-0.5b", "llama-3.2-1b", "gemma-3-1b")


# -- building the sources (cached) ------------------------------------------------------------------

def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE of exactly `vocab_size` ids: the 256 byte symbols, one merge ("Ġ Ġ": llama.cpp
    refuses a gpt2 vocabulary without merges), fillers, then SPECIALS at the end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    symbol = bytes_to_unicode()
    space = symbol[ord(" ")]
    vocab = {symbol[b]: b for b in range(256)}
    vocab[space * 2] = 256
    vocab.update({f"<filler_{i}>": i for i in range(257, vocab_size - len(SPECIALS))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(space, space)]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    assert tok.get_vocab_size() == vocab_size
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[2],
                            pad_token=SPECIALS[0]).save_pretrained(out)


def build_hf(shape: Shape, out: Path, seed: int = 0) -> Path:
    """The HF folder: seeded random fp16 weights of `shape`, one safetensors file, the tokenizer."""
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from tiny import decisive_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(shape.config)
    vocab = fields["vocab_size"]
    ids = {"bos_token_id": vocab - 3, "eos_token_id": vocab - 1, "pad_token_id": vocab - 3}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, **ids)
    torch.manual_seed(seed)
    # Greedy choices made decisive (the speed does not depend on it), so engines reading the
    # same file can be seen to agree.
    model = decisive_weights(AutoModelForCausalLM.from_config(config))
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    model.half().save_pretrained(part, safe_serialization=True, max_shard_size="100GB")
    write_tokenizer(part, vocab)
    del model
    shutil.rmtree(out, ignore_errors=True)
    part.rename(out)
    return out


def write_f16_gguf(hf: Path, out: Path) -> Path:
    """The F16 GGUF llama.cpp's converter would write (matrices F16, norms and biases F32)."""
    if out.is_file():
        return out
    from gguf import GGMLQuantizationType
    from gguf_writer import write_tiny_gguf

    part = out.with_name(out.name + ".part")
    f16 = GGMLQuantizationType.F16
    write_tiny_gguf(hf, part, {"_proj.weight": f16, "embed_tokens.weight": f16, "lm_head.weight": f16})
    part.rename(out)
    return out


def quantize_gguf(f16: Path, out: Path, kind: str, threads: int, log: Path) -> str | None:
    """llama.cpp's quantizer, in a process of its own (a crashing build takes only that down);
    a reason string when it cannot run."""
    if out.is_file():
        return None
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (its quantizer makes the file)"
    report.stage(f"quantizing {f16.name} to {kind} with llama.cpp (log: {log})")
    part = out.with_name(out.name + ".part")
    cmd = [sys.executable, __file__, "--quantize", str(f16), str(part), kind, str(threads)]
    done = run_measured(cmd, log=log, heartbeat=f"still quantizing to {kind}")
    if done["rc"] != 0 or not part.is_file():
        part.unlink(missing_ok=True)
        return f"llama.cpp's quantizer failed (exit {done['rc']}; see {log})"
    part.rename(out)
    return None


def _quantize_main(f16: str, out: str, kind: str, threads: str) -> int:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = int(threads)
    return int(llama_cpp.llama_model_quantize(f16.encode(), out.encode(), ctypes.byref(params)))


def export_bundle(source: Path, out: Path, log: Path, skip: bool) -> dict[str, Any]:
    """`edgellm export SOURCE -o OUT --no-eval` in its own process: wall time, peak RSS, exit."""
    if skip and (out / "manifest.json").is_file():
        return {"skipped": f"--skip-export (reused {out})"}
    report.stage(f"edgellm export {source.name} -> {out} (log: {log})")
    flag = log.with_suffix(".result.json")
    cmd = [sys.executable, str(WORKER), "export", str(flag), "--", str(source), "-o", str(out),
           "--no-eval", "--force"]
    measured = run_measured(cmd, log=log, heartbeat=f"still exporting {source.name}")
    done = json.loads(flag.read_text()) if flag.is_file() else {}
    flag.unlink(missing_ok=True)
    return {**measured, **done}  # the worker's own peak RSS wins (see worker.peak_rss_mb)


# -- what a decode step reads, from the files themselves ---------------------------------------------

def _onnx_nbytes(tensor: Any) -> int:
    from onnx import TensorProto, helper

    count = math.prod(tensor.dims)
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


# Nodes that pass a tensor on without reading it anew: a weight behind one is read where it is used.
_VIEWS = ("Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten")


def onnx_bytes_per_token(model: Path, ids_input: str = "input_ids") -> dict[str, int]:
    """Bytes of weights one decode step reads: every initializer of every MatMulNBits (weight,
    scales, zero points, bias) or float MatMul/Gemm, plus one row of each table gathered by the
    token ids (the embedding: edgellm gathers lm_head's weight, scales and offsets separately,
    genai gathers a reshaped view of lm_head's weight in one GatherBlockQuantized)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(model), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}

    def origin(name: str) -> str:
        """The tensor `name` is a view of: an initializer, a graph input or a computed value."""
        while name not in inits and name in made_by and made_by[name].op_type in _VIEWS:
            name = made_by[name].input[0]
        return name

    # A Cast of a stored tensor (edgellm's float16 GGUF scales, cast to float32 and folded at
    # load) is read at the dtype it is cast to; a Concat of stored tensors (the offset digits'
    # scales after the weight's own) reads each of them.
    widths = {node.input[0]: helper.tensor_dtype_to_np_dtype(a.i).itemsize for node in graph.node
              if node.op_type == "Cast" and node.input[0] in inits for a in node.attribute if a.name == "to"}

    def nbytes(name: str) -> int:
        t = inits[name]
        return math.prod(t.dims) * widths[name] if name in widths else _onnx_nbytes(t)

    def sources(name: str) -> list[str]:
        name = origin(name)
        node = made_by.get(name)
        if name not in inits and node is not None and node.op_type == "Concat":
            return [s for i in node.input for s in sources(i)]
        return [name] if name in inits else []

    matmul: set[str] = set()
    row = 0
    for node in graph.node:
        stored = [(i, s) for i, name in enumerate(node.input) for s in sources(name)]
        if node.op_type in ("MatMulNBits", "MatMul", "Gemm"):
            matmul.update(name for _, name in stored)
        elif node.op_type in ("Gather", "GatherBlockQuantized") and len(node.input) > 1 \
                and origin(node.input[1]) == ids_input:
            row += sum(nbytes(name) // inits[name].dims[0] for i, name in stored if i != 1)
    weights = sum(nbytes(n) for n in matmul)
    return {"matmul": weights, "embedding_row": row, "total": weights + row}


def gguf_bytes_per_token(path: Path) -> dict[str, int]:
    """Bytes llama.cpp reads a decode step: every tensor of the file, except that the token
    embedding is gathered one row at a time, unless it is also the output matrix (tied: no
    output.weight), which reads it whole."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    embd = tensors["token_embd.weight"]
    row = int(embd.n_bytes) // int(embd.shape[-1])  # GGUF shapes run innermost first: [hidden, vocab]
    everything = sum(int(t.n_bytes) for t in tensors.values())
    table = int(embd.n_bytes) if "output.weight" in tensors else 0
    return {"tensors": everything, "embedding_table_not_read": table, "embedding_row": row,
            "total": everything - table + row}


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- one shape: its sources, the models each engine runs, and their runs -------------------------------

@dataclass
class Row:
    """One engine on one model made from one source of one shape."""

    shape: str
    source: str  # one of SOURCES
    engine: str  # one of ENGINES
    model: Path | None = None
    skipped: str | None = None
    export: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.shape} · {self.source} · {report.LABELS[self.engine]}"


def _installed(engine: str) -> str | None:
    if importlib.util.find_spec(MODULES[engine]) is None:
        return f"{MODULES[engine]} is not installed"
    if engine == "genai" and importlib.util.find_spec("onnx_ir") is None:
        return "onnx-ir is not installed (genai's model builder needs it: pip install onnx-ir)"
    return None


def prepare(shape: Shape, args: argparse.Namespace) -> tuple[dict[str, Any], list[Row]]:
    """Build (or reuse) the sources of `shape` and the model each engine runs; the rows to time."""
    base = args.work / shape.name
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report.stage(f"{shape.name}: HF folder ({shape.origin}) and F16 GGUF under {base}")
    hf = build_hf(shape, base / "hf")
    f16 = write_f16_gguf(hf, base / f"{shape.name}-F16.gguf")
    sources: dict[str, Any] = {"HF": {"path": str(hf), "disk_bytes": disk_bytes(hf)},
                               "GGUF F16": {"path": str(f16), "disk_bytes": disk_bytes(f16)}}
    files: dict[str, Path | None] = {"HF": hf}
    reasons: dict[str, str] = {}
    needs_gguf = {"edgellm", "llamacpp"} & set(args.engines)
    for kind in GGUF_TYPES:
        src, gguf = f"GGUF {kind}", base / f"{shape.name}-{kind}.gguf"
        why = "not asked for"
        if needs_gguf:
            why = quantize_gguf(f16, gguf, kind, args.threads, logs / f"quantize-{kind}.log")
        files[src] = None if why else gguf
        if why:
            reasons[src] = why
        else:
            sources[src] = {"path": str(gguf), "disk_bytes": disk_bytes(gguf),
                            "bytes_per_token": gguf_bytes_per_token(gguf)}

    rows: list[Row] = []
    for src in SOURCES:
        peer = "genai" if src == "HF" else "llamacpp"
        for engine in ("edgellm", peer):
            if engine not in args.engines:
                continue
            row = Row(shape.name, src, engine)
            rows.append(row)
            row.skipped = _installed(engine) or (f"no {src} file: {reasons[src]}" if files[src] is None else None)
            if row.skipped:
                continue
            tag = src.split()[-1].lower()
            if engine == "edgellm":
                row.model = base / f"edgellm-{tag}"
                row.export = export_bundle(files[src], row.model, logs / f"export-{tag}.log", args.skip_export)
                if row.export.get("rc", 0) != 0:
                    row.skipped = f"edgellm export failed (exit {row.export['rc']}; see {logs / f'export-{tag}.log'})"
            elif engine == "genai":
                row.model = base / "genai-int4"
                row.skipped = build_genai(hf, row.model, logs / "genai-build.log")
            else:
                row.model = files[src]
    return {"config": shape.config, "origin": shape.origin, "sources": sources}, rows


def model_facts(row: Row) -> dict[str, Any]:
    """Size on disk and bytes read per token of the model the row runs."""
    assert row.model is not None
    if row.engine == "llamacpp":
        per_token = gguf_bytes_per_token(row.model)
    elif row.engine == "edgellm":
        manifest = json.loads((row.model / "manifest.json").read_text())
        per_token = onnx_bytes_per_token(row.model / manifest["graph"]["file"])
    else:
        genai = json.loads((row.model / "genai_config.json").read_text())
        per_token = onnx_bytes_per_token(row.model / genai["model"]["decoder"]["filename"])
    return {"disk_bytes": disk_bytes(row.model), "bytes_per_token": per_token,
            "pi5_bound_tokens_per_s": PI5_BYTES_PER_S / per_token["total"]}


def run_once(row: Row, work: dict[str, Any], run_dir: Path, round_no: int) -> None:
    """One process of `row`'s engine: a warm-up generation, then the measured one."""
    slug = f"{row.shape}-{row.source.split()[-1]}-{row.engine}".lower()
    config, out, log = (run_dir / f"{slug}.{ext}" for ext in ("config.json", "speed.json", "log"))
    config.write_text(json.dumps({**work, "engine": row.engine, "model": str(row.model)}))
    out.unlink(missing_ok=True)
    measured = run_measured([sys.executable, str(WORKER), "speed", str(config), str(out)], log=log)
    if measured["rc"] != 0 or not out.is_file():
        row.skipped = f"its process failed in round {round_no} (exit {measured['rc']}; log: {log})"
        report.stage(f"{row.label}: skipped from now on: {row.skipped}")
        return
    result = json.loads(out.read_text())
    short = result["short"]
    run = {**measured, "decode_tokens_per_s": short["decode_tokens_per_s"], "ttft_s": short["ttft_s"],
           "completion_tokens": short["completion_tokens"], "first_ids": short["first_ids"],
           "load_s": result["load_s"], "peak_rss_mb": result["peak_rss_mb"]}
    row.runs.append(run)
    report.stage(f"round {round_no}: {row.label}: {run['decode_tokens_per_s']:.1f} tok/s, "
                 f"TTFT {run['ttft_s'] * 1000:.0f} ms, peak RSS {run['peak_rss_mb']:.0f} MB")


def summary(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": row.shape, "source": row.source, "engine": row.engine,
                           "model": str(row.model) if row.model else None}
    if row.export:
        out["export"] = row.export
    if row.skipped and not row.runs:
        return {**out, "skipped": row.skipped}
    median = {k: statistics.median(r[k] for r in row.runs) for k in ("decode_tokens_per_s", "ttft_s", "peak_rss_mb")}
    rates = [r["decode_tokens_per_s"] for r in row.runs]
    # Fastest over slowest round, compared with UNSTABLE in the table.
    spread = max(rates) / min(rates) if min(rates) > 0 else None
    return {**out, **median, **model_facts(row), "skipped": row.skipped, "decode_spread": spread,
            "first_ids": row.runs[0]["first_ids"], "runs": row.runs}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(rows: list[dict[str, Any]]) -> None:
    """Each edgellm row over llama.cpp on the same file and over genai's int4 build: decode
    (> 1 is better), peak RSS and size on disk (< 1 is better); stored in the row."""
    done = [r for r in rows if "decode_tokens_per_s" in r]
    for ours in (r for r in done if r["engine"] == "edgellm"):
        for peer, same in (("llamacpp", True), ("genai", False)):
            theirs = next((r for r in done if r["shape"] == ours["shape"] and r["engine"] == peer
                           and (r["source"] == ours["source"] or not same)), None)
            if theirs:
                ours[f"vs_{peer}"] = {k: _ratio(ours[k], theirs[k])
                                      for k in ("decode_tokens_per_s", "peak_rss_mb", "disk_bytes")}
        same_file = next((r for r in done if r["engine"] == "llamacpp" and r["shape"] == ours["shape"]
                          and r["source"] == ours["source"]), None)
        if same_file:  # a sanity check that both read the file alike (int4 rounding may part them early)
            ours["first_ids_shared_with_llamacpp"] = report.shared_prefix(ours["first_ids"], same_file["first_ids"])


def bars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 20's "done when", per shape and GGUF source: bundle <= 1.1x the GGUF on disk, peak RSS
    <= llama.cpp's and decode >= 1.0x llama.cpp's on the same file; edgellm from the HF folder
    against genai's int4 build of it."""
    out = []
    for r in (r for r in rows if r["engine"] == "edgellm"):
        where = f"{r['shape']} {r['source']}:"
        if r["source"] == "HF":
            out.append(report._bar(f"{where} edgellm decode >= 1.0x onnxruntime-genai int4",
                                   r.get("vs_genai", {}).get("decode_tokens_per_s"), 1.0, True))
            continue
        gguf = next((s for s in rows if s["shape"] == r["shape"] and s["source"] == r["source"]
                     and s["engine"] == "llamacpp" and "disk_bytes" in s), None)
        size = _ratio(r.get("disk_bytes"), gguf["disk_bytes"]) if gguf else None
        vs = r.get("vs_llamacpp", {})
        out += [
            report._bar(f"{where} edgellm bundle <= 1.1x the GGUF on disk", size, 1.1, False),
            report._bar(f"{where} edgellm peak RSS <= llama.cpp's", vs.get("peak_rss_mb"), 1.0, False),
            report._bar(f"{where} edgellm decode >= 1.0x llama.cpp", vs.get("decode_tokens_per_s"), 1.0, True),
        ]
    return out


def table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    fmt = report._fmt
    lines = [("shape", "source", "engine", "decode tok/s", "TTFT", "peak RSS", "on disk", "read/token",
              "11 GB/s allows", "vs llama.cpp", "vs genai")]
    notes = []
    for r in rows:
        if "decode_tokens_per_s" not in r:
            notes.append(f"{r['shape']} · {r['source']} · {report.LABELS[r['engine']]}: skipped: {r['skipped']}")
            continue
        lines.append((
            r["shape"], r["source"], report.LABELS[r["engine"]], f"{r['decode_tokens_per_s']:.1f}",
            f"{r['ttft_s'] * 1000:.0f} ms", f"{r['peak_rss_mb']:.0f} MB", f"{r['disk_bytes'] / report.MB:.0f} MB",
            f"{r['bytes_per_token']['total'] / report.MB:.0f} MB", f"{r['pi5_bound_tokens_per_s']:.1f} tok/s",
            fmt(r.get("vs_llamacpp", {}).get("decode_tokens_per_s"), ".2f", "x"),
            fmt(r.get("vs_genai", {}).get("decode_tokens_per_s"), ".2f", "x"),
        ))
        name = f"{r['shape']} · {r['source']} · {report.LABELS[r['engine']]}"
        if r.get("skipped"):
            notes.append(f"{name}: fewer runs: {r['skipped']}")
        if (r["decode_spread"] or 0) > UNSTABLE:
            notes.append(f"{name}: unstable, rounds {r['decode_spread']:.1f}x apart: rerun on a quiet machine")
    text = report.grid(lines)
    text.append(f"(decode: {settings['tokens']} greedy tokens after a {settings['prompt_tokens']}-token id prompt, "
                f"EOS ignored, {settings['threads']} threads, median of {settings['runs']} interleaved rounds, one "
                "process per engine per round; read/token: weights a decode step reads, from the graph or GGUF; "
                "'vs' columns: edgellm's decode rate over llama.cpp on the same file, and over genai's int4 build)")
    return "\n".join(text + notes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgellm-bench" / "shapes",
                   help="where the built models go (reused by later runs) and the run files")
    p.add_argument("--runs", type=int, default=3, help="interleaved rounds; each number is their median")
    p.add_argument("--tokens", type=int, default=128, help="greedy tokens per run")
    p.add_argument("--prompt", type=int, default=64, help="prompt length, tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--skip-export", action="store_true", help="reuse edgellm bundles of an earlier run")
    p.add_argument("--json", type=Path, help="write the raw results here")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if bad := (set(args.shapes) - set(SHAPES)) | (set(args.engines) - set(ENGINES)):
        p.error(f"unknown {', '.join(sorted(bad))} (shapes: {', '.join(SHAPES)}; engines: {', '.join(ENGINES)})")
    if not 1 <= args.prompt <= len(PROMPT_TEXT):
        p.error(f"--prompt must be 1 to {len(PROMPT_TEXT)} tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--quantize"]:  # the quantizer's own process (quantize_gguf)
        return _quantize_main(*argv[1:])
    args = parse_args(argv)
    machine = report.machine_info()
    report.warn_if_busy(machine)
    ids = list(PROMPT_TEXT.encode("ascii")[: args.prompt])
    work = {"threads": args.threads, "tokens": args.tokens, "runs": 1, "context": len(ids) + args.tokens + 8,
            "prompts": {"short": {"text": "", "ids": ids}}}
    shapes, rows = {}, []
    for name in args.shapes:
        shapes[name], built = prepare(SHAPES[name], args)
        rows += built
    for row in (r for r in rows if r.skipped):
        report.stage(f"{row.label}: skipped: {row.skipped}")
    run_dir = args.work / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    for round_no in range(1, args.runs + 1):
        live = [r for r in rows if not r.skipped]
        shift = (round_no - 1) % max(len(live), 1)  # each round starts with another engine
        for row in live[shift:] + live[:shift]:
            run_once(row, work, run_dir, round_no)
    done = [summary(r) for r in rows]
    ratios(done)
    settings = {"shapes": args.shapes, "threads": args.threads, "tokens": args.tokens, "runs": args.runs,
                "prompt_tokens": len(ids), "pi5_bytes_per_s": PI5_BYTES_PER_S, "engines": args.engines}
    checks = bars(done)
    results = {"machine": {**machine, "load_average_end": os.getloadavg()[0]}, "settings": settings,
               "shapes": shapes, "rows": done, "bars": checks}
    report.emit(results, table(done, settings), report.bar_lines(checks), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

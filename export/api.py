"""`export_model`: source -> graph -> quantized weights -> quality gate -> bundle.

The one entry point the CLI and tests call; each stage lives in its own module.
"""
from __future__ import annotations

import dataclasses
import logging
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from edgellm import __version__
from edgellm.runtime.bundle import Manifest, finalize_manifest
from edgellm.errors import BundleError, ExportError

from . import arch
from .config import DEFAULT_MAX_CONTEXT, GraphInfo, QuantConfig
from .quality import eval_ids, perplexity
from .scratch import owned_bundle_writer, remove_stale, scratch_dir, terminate_cleans_up
from .embedding import export_embedding, is_encoder
from .sources import Source, source_path

log = logging.getLogger("edgellm.export")

Progress = Callable[[str, int, int], None]
Via = Literal["auto", "fast", "optimum"]


def export_model(
    source: str | Path,
    out: str | Path,
    *,
    quant: QuantConfig = QuantConfig(),
    via: Via = "auto",
    force: bool = False,
    eval_text: str | None = None,
    max_ppl_ratio: float = 1.05,
    evaluate: bool = True,
    progress: Progress | None = None,
    requantize: bool = False,
    allow_quality_loss: bool = False,
    max_context: int | None = None,
    lora: str | Path | None = None,
) -> Manifest:
    """Export `source` (HF folder, .gguf, or a built-in name) to the bundle directory `out`.

    Nothing is left at `out` unless the whole export succeeds, and nothing beside it even after
    SIGTERM; what a killed export left beside it is removed first (`scratch`). GGUF blocks of
    every common type are imported as they are under int4 block 32 unless `requantize`
    (weights.py). A bundle whose perplexity exceeds `max_ppl_ratio` times its source's is not
    written unless `allow_quality_loss`. `max_context` (default: the model's, at most
    DEFAULT_MAX_CONTEXT) is the longest context the bundle runs at. An int8 KV cache
    (`quant.kv_cache`) is calibrated on the evaluation text. `quant.target` "cuda" builds the
    float16 graph; its quality gate runs it on the CPU provider against the fp32 graph. `lora`, a
    PEFT LoRA adapter folder (any base) or a llama.cpp adapter GGUF (GGUF bases), is merged into the
    base's weights before quantization (lora.py).
    """
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists (use --force to overwrite)")
    if via not in ("auto", "fast", "optimum"):
        raise ExportError(f"--via {via!r}: expected fast or optimum")
    progress = progress or (lambda stage, done, total: None)
    if is_encoder(folder := source_path(source)):
        return _export_embedding(folder, out, quant, force, eval_text, evaluate, allow_quality_loss, progress)

    progress("read", 0, 1)
    src = open_source(source, lora)
    trained_context = src.spec.max_context
    src.spec = dataclasses.replace(src.spec, max_context=_bundle_context(src.spec.max_context, max_context))
    path = _choose_path(src, via)
    if lora is not None and path != "fast":
        raise ExportError("--lora merges into the fast export path's weights; use --via fast")
    quant = dataclasses.replace(quant, kv_cache=quant.resolved_kv_cache(path == "fast"))
    ids = _eval_ids(src, eval_text)
    progress("read", 1, 1)
    try:
        remove_stale(out.parent)
        with terminate_cleans_up(), owned_bundle_writer(out, force) as tmp:
            info = _build(path, src, quant, tmp, progress, requantize, ids)
            if (adapter := getattr(src, "lora", None)) is not None:
                info.notes.append(adapter.note(getattr(src, "stored_types", {})))
            if src.spec.max_context < trained_context:
                info.notes.append(f"context: {src.spec.max_context} positions (the model's max_position_embeddings "
                                  f"{trained_context}; --max-context raises it)")
            (tmp / "tokenizer.json").write_text(src.tokenizer_json, encoding="utf-8")
            if src.chat_template:
                (tmp / "chat_template.jinja").write_text(src.chat_template, encoding="utf-8")
            manifest = Manifest(
                name=_name(src),
                spec=src.spec,
                graph=info.graph(),
                quantization={**quant.to_dict(), "notes": info.notes},
                generation=src.generation,
                source=src.describe(),
                exporter=_versions(path),
            )
            if evaluate:
                manifest.quality = _quality_gate(path, src, quant, tmp, info, ids, bool(eval_text),
                                                 max_ppl_ratio, progress)
                kept_blocks = src.path.is_file() and not requantize and quant.block_size == 32
                _enforce(manifest.quality, quant, info, kept_blocks, allow_quality_loss)
            progress("write", 0, 1)
            finalize_manifest(tmp, manifest)
            progress("write", 1, 1)
    except BundleError as exc:
        raise ExportError(str(exc)) from None
    except OSError as exc:
        raise ExportError(f"{out}: cannot write bundle ({exc.strerror or exc})") from None
    return manifest


def open_source(source: str | Path, lora: str | Path | None = None) -> Source:
    """Open a HF folder, a .gguf file or a built-in model name; `lora`: an adapter to merge (lora.py)."""
    path = source_path(source)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    if path.is_dir():
        from .hf import open_hf_folder
        from .lora import open_adapter

        return open_hf_folder(path, open_adapter(lora) if lora is not None else None)
    if path.suffix.lower() == ".gguf":
        from .gguf import open_gguf
        from .lora import open_adapter

        src = open_gguf(path)
        if lora is not None:
            src.attach_lora(open_adapter(lora, src))
        return src
    raise ExportError(f"{path}: not a model folder or a .gguf file")


def _export_embedding(folder: Path, out: Path, quant: QuantConfig, force: bool, eval_text: str | None,
                      evaluate: bool, allow_quality_loss: bool, progress: Progress) -> Manifest:
    """An encoder (BERT-class sentence embedding model) -> a bundle of kind `embedding`."""
    try:
        remove_stale(out.parent)
        with terminate_cleans_up(), owned_bundle_writer(out, force) as tmp:
            return export_embedding(folder, tmp, quant=quant, name=out.name, eval_text=eval_text,
                                    evaluate=evaluate, allow_quality_loss=allow_quality_loss, progress=progress)
    except BundleError as exc:
        raise ExportError(str(exc)) from None
    except OSError as exc:
        raise ExportError(f"{out}: cannot write bundle ({exc.strerror or exc})") from None


def _bundle_context(trained: int, asked: int | None) -> int:
    """The positions the bundle's rotary tables hold and edgellm.load caps its context at."""
    if asked is None:
        return min(trained, DEFAULT_MAX_CONTEXT)
    if isinstance(asked, bool) or not isinstance(asked, int) or not 2 <= asked <= trained:
        raise ExportError(f"--max-context {asked}: expected 2 to the model's max_position_embeddings {trained}")
    return asked


def _choose_path(src: Source, via: Via) -> Literal["fast", "optimum"]:
    if via == "optimum":
        if not src.path.is_dir():
            raise ExportError(f"{src.path}: the optimum path needs a Hugging Face folder, not a GGUF file")
        return "optimum"
    if arch.by_spec(src.spec.arch) is not None:
        return "fast"
    if via == "fast":
        raise ExportError(f"{src.path}: architecture {src.spec.arch!r} has no fast graph "
                          f"(fast: {', '.join(arch.FAST_ARCHS)}; try --via optimum)")
    return "optimum"


def _build(
    path: str,
    src: Source,
    quant: QuantConfig,
    out_dir: Path,
    progress: Progress,
    requantize: bool = False,
    calibration_ids: Sequence[int] = (),
) -> GraphInfo:
    if path == "fast" and quant.target == "qnn":
        from .qnn import build_qnn_graph

        return build_qnn_graph(src, quant, out_dir, progress)
    if path == "fast":
        from .graph import build_fast_graph

        scales = None
        if quant.kv_cache == "int8":
            from .calibrate import calibrate_kv_scales

            scales = calibrate_kv_scales(src, quant, calibration_ids, out_dir.parent, progress, requantize=requantize)
        return build_fast_graph(src, quant, out_dir, progress, requantize=requantize, kv_scales=scales)
    from .optimum_path import export_optimum

    return export_optimum(src.path, out_dir, quant, progress)


def _quality_gate(
    path: str,
    src: Source,
    quant: QuantConfig,
    bundle_dir: Path,
    info: GraphInfo,
    ids: list[int],
    custom_text: bool,
    max_ratio: float,
    progress: Progress,
) -> dict[str, Any]:
    """Perplexity of the bundle and of the fp32 graph (float32 KV) of the same weights, on one text."""
    progress("evaluate", 0, 2)
    graph = info.graph()
    ids = ids[: info.context or len(ids)]  # a qnn graph reads no more than its context
    ppl = perplexity(bundle_dir / info.file, graph, src.spec, ids)
    progress("evaluate", 1, 2)
    if quant.weights == "fp32" and quant.kv_cache == "float32":
        source_ppl = ppl
    else:
        with scratch_dir(bundle_dir.parent, ".reference.") as ref:
            ref_info = _build(path, src, QuantConfig(weights="fp32"), ref, lambda *a: None)
            source_ppl = perplexity(ref / ref_info.file, ref_info.graph(), src.spec, ids)
    progress("evaluate", 2, 2)
    ratio = ppl / source_ppl
    return {
        "text": "custom" if custom_text else "builtin",
        "tokens": len(ids),
        "perplexity": round(ppl, 4),
        "source_perplexity": round(source_ppl, 4),
        "ratio": round(ratio, 4),
        "max_ratio": max_ratio,
        "passed": ratio <= max_ratio,
    }


def _enforce(quality: dict[str, Any], quant: QuantConfig, info: GraphInfo, kept_blocks: bool, allow: bool) -> None:
    """A bundle past the gate is refused (ExportError, nothing written) unless `allow`: then a warning."""
    if quality["passed"]:
        return
    message = (f"perplexity {quality['perplexity']:.3f} is {quality['ratio']:.3f}x the source's "
               f"{quality['source_perplexity']:.3f} (limit {quality['max_ratio']}x): this bundle answers worse "
               f"than its source; {_loss_causes(quant, info, kept_blocks)}")
    if not allow:
        raise ExportError(f"{message}; not written (--allow-quality-loss writes it anyway)")
    log.warning("QUALITY WARNING: %s", message)


def _loss_causes(quant: QuantConfig, info: GraphInfo, kept_blocks: bool) -> str:
    """Where the loss comes from, for the gate's message: the freshly rounded weights that lost
    the most (relative RMS error against the source's values), else the activations and cache.
    `kept_blocks`: a GGUF's blocks were imported, so the rounded weights are its float tensors."""
    if info.worst_weights:
        hint = "--quant int8 rounds them less"
        if not kept_blocks and quant.weights == "int4":  # what helps an int4 rounding; never the flag given
            finer = f", --block-size {quant.block_size // 2} rounds finer" if quant.block_size > 16 else ""
            hint += f"{finer}; from a GGUF, leaving out --requantize keeps its own blocks"
        return "the weights rounded here that lost the most: " + "; ".join(info.worst_weights) + f" ({hint})"
    lossy = [f"int8 activations (accuracy level {quant.accuracy_level}; --accuracy-level 0 is exact)"
             if quant.accuracy_level else "", "the int8 KV cache (--kv-cache float32)" if quant.kv_cache == "int8" else "",
             f"float16 activations (--target {quant.target})" if quant.target == "cuda" else ""]
    causes = ", ".join(c for c in lossy if c)
    kept = f" but {'; '.join(info.reblocked)}" if info.reblocked else ""
    return f"every weight kept its source's values{kept}; the loss is the {causes or 'graph arithmetic'}"


def _eval_ids(src: Source, eval_text: str | None) -> list[int]:
    """The token ids the quality gate and KV calibration read: the text as the model sees it."""
    ids = eval_ids(src.tokenizer_json, src.generation, src.spec.max_context, eval_text)
    if len(ids) < 2:
        raise ExportError("evaluation text is shorter than two tokens")
    return ids


def _name(src: Source) -> str:
    return src.path.stem if src.path.is_file() else src.path.name


def _versions(path: str) -> dict[str, Any]:
    names = ["onnxruntime", "onnx", "numpy", "tokenizers", "gguf", "safetensors"]
    if path == "optimum":
        names += ["torch", "transformers", "optimum-onnx"]
    found: dict[str, Any] = {"edgellm": __version__, "path": path, "python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found

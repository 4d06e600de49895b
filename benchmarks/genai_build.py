"""Build onnxruntime-genai's int4 CPU model from a GGUF file, offline.

Run as its own process (it imports torch and transformers, which the benchmark's
other processes must not carry in their memory):

    python benchmarks/genai_build.py MODEL.gguf|HF_FOLDER OUT_DIR [--block-size 32] [--accuracy-level 4]

genai's builder reads only float GGUF files and otherwise wants a Hugging Face
folder, so the quantized GGUF is first dequantized by transformers' GGUF loader
into a local HF folder, which the builder then re-quantizes to int4 (RTN). The
folder's tokenizer is transformers' GGUF conversion, known to be wrong for SmolLM2
(see /work/shared/notes/model-sources.md); the benchmark feeds token ids, never text.
"""
from __future__ import annotations

import argparse
import runpy
import shutil
import sys
from pathlib import Path

# genai 0.18's builder imports model classes that transformers < 4.58 (pinned by
# optimum-onnx) does not have; only the ones for unrelated architectures are missing,
# so placeholders let the llama path import and run unchanged.
_NEWER_TRANSFORMERS_NAMES = (
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration",
)


def write_hf_folder(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a Hugging Face checkpoint folder at `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) insists on accelerate; the loader underneath does not.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The builder expects transformers 5's config, where rope settings are never null.
    config.rope_scaling = config.rope_scaling or {"rope_type": "default"}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"{gguf}: GGUF tensors do not match the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def run_builder(hf_dir: Path, out: Path, cache: Path, block_size: int, accuracy_level: int) -> None:
    import transformers

    for name in _NEWER_TRANSFORMERS_NAMES:
        if name not in dir(transformers):
            setattr(transformers, name, type(name, (), {}))
    sys.argv = [
        "builder", "-i", str(hf_dir), "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(cache),
        "--extra_options", f"block_size={block_size}", f"accuracy_level={accuracy_level}",
    ]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a .gguf file or a Hugging Face folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--accuracy-level", type=int, default=4)
    args = parser.parse_args()
    hf_dir, scratch = args.source, args.out.parent / f".{args.out.name}.hf"
    if args.source.is_file():
        print(f"dequantizing {args.source.name} into {scratch}", file=sys.stderr, flush=True)
        write_hf_folder(args.source, scratch)
        hf_dir = scratch
    cache = args.out.parent / f".{args.out.name}.cache"
    print(f"building genai int4 model in {args.out}", file=sys.stderr, flush=True)
    run_builder(hf_dir, args.out, cache, args.block_size, args.accuracy_level)
    # Only the built model is kept: the float copy is 4x its size and never read again.
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write a tiny HF checkpoint (tests/tiny.py) as a GGUF file, the way llama.cpp's converter would.

Kept independent of export/gguf.py on purpose: names, the q/k permutation and the
llama3 rope factors are written here from llama.cpp's and transformers' definitions,
so reading the file back tests the reader rather than agreeing with itself.
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize
from safetensors.numpy import load_file

Q = GGMLQuantizationType
# HF tensor suffix -> GGUF type; everything else stays F32.
DEFAULT_QTYPES = {
    "self_attn.q_proj.weight": Q.Q8_0,
    "self_attn.k_proj.weight": Q.Q4_0,
    "mlp.gate_proj.weight": Q.Q4_1,
    "mlp.down_proj.weight": Q.Q4_0,
}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
             "phi3": "phi3"}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.qkv_proj": "attn_qkv",  # Phi-3's fused projections
    "mlp.gate_up_proj": "ffn_up",
}

# llama.cpp's Gemma 3 names: its ffn_norm is the pre-feedforward norm, and two post norms.
_GEMMA3_BLOCK = {
    **_BLOCK,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


# The K-quants gguf-py cannot quantize and this file does not round: where their float16 fields
# sit in a block (d, then dmin for the types with minimums), and the largest |sub-block scale x
# code| d multiplies (ggml-quants.c's block_q*_K layouts).
_F16_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q5_K: (0, 2)}
_REACH = {Q.Q2_K: 15 * 3, Q.Q3_K: 32 * 4, Q.Q5_K: 63 * 31}


def blocks(w: np.ndarray, qtype: GGMLQuantizationType, seed: int = 0) -> np.ndarray:
    """`w` [rows, cols] as `qtype` blocks (raw uint8 rows): gguf-py's quantizer where it has
    one; Q4_K and Q6_K (the K-quants of llama.cpp's Q4_K_M) rounded to nearest here; for the
    other K-quants random codes and sub-block scales, with the float16 scales sized so the
    values span about `w`'s range. Any bytes are a valid weight, and the reader is checked
    against gguf-py's dequantization of these bytes, whatever they hold."""
    if qtype in _ROUNDED:
        return _ROUNDED[qtype](w)
    if qtype not in _F16_FIELDS:
        return quantize(w, qtype)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    rows, cols = w.shape
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.5, size=raw.shape[:2]) * (float(np.abs(w).max()) or 1.0) / _REACH[qtype])
    fields = [d, d * (2 if qtype == Q.Q2_K else 16)]  # dmin: the middle code's worth
    for offset, value in zip(_F16_FIELDS[qtype], fields):
        raw[..., offset : offset + 2] = value.astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype == Q.Q5_K:
        # Minimums near each sub-block's middle code, as a quantizer picks them for centred
        # weights, give small offsets; random ones would give every block a large mean.
        sc = rng.integers(0, 64, size=(*raw.shape[:2], 8))
        m = np.clip(sc + rng.integers(-3, 4, size=sc.shape), 0, 63)
        raw[..., 4:16] = np.concatenate([(sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
                                         (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
                                         (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], axis=-1)
    elif qtype == Q.Q2_K:
        sc = rng.integers(0, 16, size=(*raw.shape[:2], 16))
        raw[..., 0:16] = sc | (np.clip(sc + rng.integers(-2, 3, size=sc.shape), 0, 15) << 4)
    return raw.reshape(rows, -1)


def _q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K by rounding to nearest: per 32 values scale (max - min) / 15 and minimum -min, both
    as 6-bit multiples of the super-block's float16 d and dmin (ggml's block_q4_K)."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(rows, cols // 256, 8, 32)
    low = np.minimum(x.min(axis=-1), 0)
    scale = (x.max(axis=-1) - low) / 15
    d = (scale.max(axis=-1) / 63).astype(np.float16)
    dmin = (-low.min(axis=-1) / 63).astype(np.float16)
    sc = np.clip(np.rint(scale / np.maximum(d.astype(np.float32), 1e-30)[..., None]), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(-low / np.maximum(dmin.astype(np.float32), 1e-30)[..., None]), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32)[..., None] * sc)[..., None]
    shift = (dmin.astype(np.float32)[..., None] * m)[..., None]
    q = np.clip(np.rint((x + shift) / np.where(step == 0, 1, step)), 0, 15).astype(np.uint8)
    qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(rows, cols // 256, 128)
    packed = np.concatenate([(sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6), (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
                             (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], axis=-1)
    halves = [v[..., None].view(np.uint8) for v in (d, dmin)]
    return np.concatenate([*halves, packed, qs], axis=-1).reshape(rows, -1)


def _q6_k(w: np.ndarray) -> np.ndarray:
    """Q6_K by rounding to nearest: per 16 values a scale max|w| / 32 as an int8 multiple of the
    super-block's float16 d, codes q - 32 in [-32, 31] (ggml's block_q6_K)."""
    rows, cols = w.shape
    x = w.astype(np.float32).reshape(rows, cols // 256, 16, 16)
    scale = np.abs(x).max(axis=-1) / 31.5
    d = (scale.max(axis=-1) / 127).astype(np.float16)
    sc = np.clip(np.rint(scale / np.maximum(d.astype(np.float32), 1e-30)[..., None]), 0, 127).astype(np.int8)
    step = (d.astype(np.float32)[..., None] * sc)[..., None]
    q = (np.clip(np.rint(x / np.where(step == 0, 1, step)), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(rows, cols // 256, 2, 4, 32)  # value 128h + 32s + i
    ql = (q[:, :, :, 0:2] & 15) | ((q[:, :, :, 2:4] & 15) << 4)  # byte 64h + 32s' + i, s' in {0, 1}
    qh = (q >> 4)[..., 0, :] | ((q >> 4)[..., 1, :] << 2) | ((q >> 4)[..., 2, :] << 4) | ((q >> 4)[..., 3, :] << 6)
    return np.concatenate([ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), sc.view(np.uint8),
                           d[..., None].view(np.uint8)], axis=-1).reshape(rows, -1)


_ROUNDED = {Q.Q4_K: _q4_k, Q.Q6_K: _q6_k}


def gguf_name(hf: str, arch: str = "llama") -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{(_GEMMA3_BLOCK if arch == 'gemma3' else _BLOCK)[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freqs(config: dict) -> np.ndarray:
    """llama.cpp's rope_freqs tensor: base inverse frequencies over transformers' llama3 ones."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.for_model(**config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base, _ = ROPE_INIT_FUNCTIONS["default"](cfg, "cpu")
    return (base / scaled).numpy().astype(np.float32)


def write_tiny_gguf(
    hf_folder: Path,
    out_path: Path,
    qtypes: dict[str, GGMLQuantizationType] | None = None,
    *,
    pre: str = "gpt-2",
    arch: str | None = None,
) -> Path:
    """Write `hf_folder` as a GGUF at `out_path`: weights (some quantized) and vocabulary.

    `qtypes` maps HF name suffixes to GGUF types (default DEFAULT_QTYPES); `pre` is the
    tokenizer.ggml.pre name; `arch` overrides general.architecture (for error tests).
    """
    hf_folder = Path(hf_folder)
    qtypes = DEFAULT_QTYPES if qtypes is None else qtypes
    config = json.loads((hf_folder / "config.json").read_text())
    arch = arch or GGUF_ARCH[config["model_type"]]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads

    w = GGUFWriter(str(out_path), arch)
    w.add_file_type(LlamaFileType.ALL_F32)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * config.get("partial_rotary_factor", 1.0)))
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    if arch == "gemma3":
        # llama.cpp fixes the layer pattern (every 6th global), local base and softmax scalar.
        assert config["layer_types"] == [("full" if (i + 1) % 6 == 0 else "sliding") + "_attention"
                                         for i in range(config["num_hidden_layers"])]
        assert config["query_pre_attn_scalar"] == head_dim and config["rope_local_base_freq"] == 10000.0
        w.add_sliding_window(config["sliding_window"])
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if arch == "phi3":
        # convert_hf_to_gguf's Phi3MiniModel: factors as tensors, the attention factor as metadata.
        w.add_sliding_window(config.get("sliding_window") or 0)
        original = config["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        if scaling:
            scale = config["max_position_embeddings"] / original
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
            w.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], dtype=np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], dtype=np.float32))
    elif kind == "llama3":
        w.add_tensor("rope_freqs.weight", rope_freqs(config))
    elif kind in ("linear", "yarn"):
        w.add_string(f"{arch}.rope.scaling.type", kind)
        w.add_rope_scaling_factor(scaling["factor"])
        if "original_max_position_embeddings" in scaling:
            w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])

    for name, value in load_file(hf_folder / "model.safetensors").items():
        value = value.astype(np.float32)
        if arch == "llama" and ".self_attn.q_proj." in name:
            value = llama_cpp_permute(value, heads)
        if arch == "llama" and ".self_attn.k_proj." in name:
            value = llama_cpp_permute(value, kv_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            value = value + 1  # convert_hf_to_gguf's Gemma3Model stores x·(1+w)'s 1+w
        qtype = next((t for suffix, t in qtypes.items() if name.endswith(suffix)), None)
        if qtype is None:
            w.add_tensor(gguf_name(name, arch), value)
        else:
            w.add_tensor(gguf_name(name, arch), blocks(value, qtype, zlib.crc32(name.encode())), raw_dtype=qtype)

    _add_vocab(w, hf_folder, config, pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def _add_vocab(w: GGUFWriter, hf_folder: Path, config: dict, pre: str) -> None:
    """A byte-level BPE tokenizer.json as tokenizer.ggml.* metadata (convert_hf_to_gguf's gpt2 path)."""
    data = json.loads((hf_folder / "tokenizer.json").read_text())
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    special = set()
    for added in data["added_tokens"]:
        by_id[added["id"]] = added["content"]
        if added["special"]:
            special.add(added["id"])
    tokens = [by_id[i] for i in range(len(by_id))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if i in special else TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_pad_token_id(config["pad_token_id"])
    w.add_add_bos_token(False)
    template = hf_folder / "chat_template.jinja"
    if template.exists():
        w.add_chat_template(template.read_text())


def requantized_gguf(source: Path, out_path: Path, qtype_of: Callable[[str, tuple[int, int]], GGMLQuantizationType]) -> Path:
    """`source` with every quantized tensor dequantized and stored again as `qtype_of(name, [rows,
    cols])` (F32 tensors stay), metadata copied: a real model in other GGUF types."""
    from gguf import GGUFReader, GGUFValueType
    from gguf.quants import dequantize

    reader = GGUFReader(source)
    w = GGUFWriter(str(out_path), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        if t.tensor_type == Q.F32:
            w.add_tensor(t.name, np.asarray(t.data))
            continue
        values = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        qtype = qtype_of(t.name, shape)
        w.add_tensor(t.name, blocks(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path

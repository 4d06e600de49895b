"""Tiny random Hugging Face models, built offline with transformers, for export tests.

Each is a real checkpoint folder (config.json, model.safetensors, tokenizer files,
generation_config.json) of a few MB, seeded so every run builds the same weights.
"""
from __future__ import annotations

from pathlib import Path

# A byte-level BPE vocabulary big enough to encode any text (256 byte tokens plus
# merges) comes from a small trained tokenizer; training is deterministic.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Edge boards run small language models close to the sensors.",
    "日本語のテキストと絵文字 🙂 も扱えます。",
] * 20

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3's chat template reduced to what edgellm reads from it: tools in the system turn,
# Hermes calls and tool responses, and the think block (history drops it; enable_thinking
# false writes an empty one). Its vocabulary needs THINK_TOOL_TOKENS.
QWEN3_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}"
    "{{ 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '"
    " + 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'"
    " + '{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set answer = message.content.split('</think>')[-1].lstrip() %}"
    "{{ '<|im_start|>assistant' }}{% if answer %}{{ '\\n' + answer }}{% endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{{ '\\n<tool_call>\\n' + ({'name': call.function.name, 'arguments': call.function.arguments} | tojson)"
    " + '\\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- elif message.role != 'system' %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{% endif %}"
)
THINK_TOOL_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")

ARCH_CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"]),
    # Layers sliding, sliding, global (repeating), a window shorter than test prompts, and a
    # softmax scale that is not head_dim's, so each of Gemma 3's choices shows when wrong.
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], sliding_window=4,
                   sliding_window_pattern=3, query_pre_attn_scalar=24, rope_theta=1_000_000.0),
    # Phi-4-mini's partial rotary; tests add longrope factors through rope_scaling (PHI3_LONGROPE).
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.75,
                 original_max_position_embeddings=64),
    # No fast graph: exported by the generic (optimum) path.
    "olmo": dict(model_type="olmo", architectures=["OlmoForCausalLM"]),
}

# longrope for a tiny phi3 of head_dim 64 (onnxruntime rotates a multiple of 16 dims; 0.75 of
# 64 gives 24 frequencies), context 512 over an original 64: attention factor sqrt(1 + ln 8 / ln 64).
PHI3_SHAPE = dict(hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=128)
PHI3_LONGROPE = {"type": "longrope", "short_factor": [round(1 + 0.15 * i, 2) for i in range(24)],
                 "long_factor": [round(1.5 * 1.25 ** i, 2) for i in range(24)]}


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (SmolLM2/Qwen style) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def decisive_weights(model):
    """Draw `model`'s weights afresh from torch's generator (the caller seeds it). Random init
    with std 0.02 gives near-uniform logits and ties everywhere; a larger scale makes greedy
    choices decisive, so token-for-token comparison means something."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.05)
    return model


def make_tiny_model(
    out: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_embeddings: bool = True,
    max_position_embeddings: int = 512,
    rope_scaling: dict | None = None,
    dtype: str = "float32",
    added_tokens: tuple[str, ...] = (),
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Write a tiny random `arch` checkpoint to `out` and return it; `added_tokens` join
    the vocabulary as whole, non-special tokens (think markers, tool-call tags)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = build_tokenizer()
    tok.add_tokens(list(added_tokens))
    vocab = tok.get_vocab_size()
    kw = dict(ARCH_CONFIGS[arch])
    model_type = kw.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_embeddings,
        rope_scaling=rope_scaling,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kw,
    )
    if arch == "mistral":
        config.sliding_window = None
    torch.manual_seed(seed)
    model = decisive_weights(AutoModelForCausalLM.from_config(config))
    model = model.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = chat_template
    fast.save_pretrained(out)
    return out

"""A `tokenizers.Tokenizer` rebuilt from GGUF vocabulary metadata, as llama.cpp reads it.

GGUF keeps only tokens, merges or scores, token types, special ids and the name of a
pre-tokenizer; transformers' own GGUF conversion guesses the rest wrongly for some
models (SmolLM2: BOS on every encode, wrong eos, SentencePiece decoder). So each
supported pre-tokenizer name maps to the HF pre-tokenizer its model was trained
with, and an unknown name is an error rather than a guess.
"""
from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from edgellm.errors import ExportError

# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Splits that run before byte-level mapping; the regexes are the ones in the models'
# own tokenizer.json files (llama.cpp carries hand-expanded copies of the same).
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split regex or None for GPT-2's, digits one per token, ignore_merges).
# ignore_merges and the llama3 BOS default follow llama.cpp's llama-vocab.cpp.
BPE_PRE: dict[str, tuple[str | None, bool, bool]] = {
    "gpt-2": (None, False, False),
    "smollm": (None, True, False),
    "qwen2": (_QWEN2, False, False),
    "llama-bpe": (_LLAMA3, False, True),
    "llama3": (_LLAMA3, False, True),
    "llama-v3": (_LLAMA3, False, True),
}
_SPM_SPACE = "\u2581"


def build_tokenizer(meta: dict[str, Any], where: str = "gguf") -> Tokenizer:
    """The tokenizer described by GGUF metadata `meta` (key -> value)."""
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ExportError(f"{where}: metadata tokenizer.ggml.tokens is missing")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if model == "gpt2":
        tok = _byte_level_bpe(meta, tokens, where)
    elif model == "llama":
        tok = _sentencepiece_bpe(meta, tokens, types, where)
    else:
        raise ExportError(f"{where}: tokenizer.ggml.model {model!r} is not supported (expected gpt2 or llama)")
    specials = [tokens[i] for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # llama.cpp matches user-defined tokens in text but prints them on decode: not "special".
    user = [tokens[i] for i, t in enumerate(types) if t == USER_DEFINED]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    post = _post_processor(meta, tokens)
    if post is not None:
        tok.post_processor = post
    return tok


def generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The Source `generation` dict: special ids and strings, BOS policy, sampling defaults."""
    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos, pad = (_token_id(meta, k) for k in ("bos", "eos", "padding"))
    stops = [i for i in (eos, _token_id(meta, "eot"), _token_id(meta, "eom")) if i is not None]
    defaults = {
        hf: meta[f"general.sampling.{key}"]
        for key, hf in (("temp", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"))
        if f"general.sampling.{key}" in meta
    }
    return {
        "bos_token_id": bos,
        "eos_token_ids": list(dict.fromkeys(stops)),
        "pad_token_id": pad,
        "add_bos_token": add_bos_token(meta),
        "bos_token": None if bos is None else tokens[bos],
        "eos_token": None if eos is None else tokens[eos],
        "defaults": defaults,
    }


def add_bos_token(meta: dict[str, Any]) -> bool:
    """llama.cpp's rule: the explicit flag, else on for SentencePiece and llama3 BPE."""
    flag = meta.get("tokenizer.ggml.add_bos_token")
    if flag is None:
        pre = BPE_PRE.get(meta.get("tokenizer.ggml.pre"))
        flag = meta.get("tokenizer.ggml.model") == "llama" or (pre is not None and pre[2])
    return bool(flag) and _token_id(meta, "bos") is not None


def _token_id(meta: dict[str, Any], name: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    if value is None or not 0 <= int(value) < len(meta["tokenizer.ggml.tokens"]):
        return None
    return int(value)


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], where: str) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in BPE_PRE:
        raise ExportError(
            f"{where}: tokenizer.ggml.pre {pre!r} is not supported (expected one of {sorted(BPE_PRE)})"
        )
    split, digits, ignore_merges = BPE_PRE[pre]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    steps: list[Any] = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=split is None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int], where: str) -> Tokenizer:
    """SentencePiece BPE: merge order from the merged piece's score, bytes as <0xXX>."""
    scores: list[float] = meta.get("tokenizer.ggml.scores") or []
    if len(scores) != len(tokens):
        raise ExportError(f"{where}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, kind in zip(tokens, types) if kind in (NORMAL, USER_DEFINED)}
    ranked = []
    for piece, i in vocab.items():
        if piece not in mergeable:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = _token_id(meta, "unknown")
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(left, right) for *_, left, right in ranked],
            unk_token=None if unk is None else tokens[unk],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # A normalizer, not Metaspace: llama.cpp prefixes a space even to text that starts
    # with one, and again after every special token, as Prepend does per segment.
    replace = normalizers.Replace(" ", _SPM_SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), replace]) if prefix else replace
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _post_processor(meta: dict[str, Any], tokens: list[str]) -> processors.TemplateProcessing | None:
    """BOS/EOS added by `encode` exactly when llama.cpp's tokenizer would add them."""
    bos, eos = _token_id(meta, "bos"), _token_id(meta, "eos")
    head = [tokens[bos]] if add_bos_token(meta) else []
    tail = [tokens[eos]] if meta.get("tokenizer.ggml.add_eos_token") and eos is not None else []
    if not head and not tail:
        return None
    return processors.TemplateProcessing(
        single=[*head, "$A", *tail],
        pair=[*head, "$A", *tail, *head, "$B:1", *tail],
        special_tokens=[(tokens[i], i) for i in {*(head and [bos]), *(tail and [eos])}],
    )


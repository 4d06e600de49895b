"""Recall on the generated corpus of benchmarks/retrieval.py: questions whose answer is in one
known manual section, searched in an index of the real all-MiniLM-L6-v2 int8 bundle's vectors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import edgellm
from edgellm.retrieval.index import Index, retrieve

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

from retrieval import corpus  # noqa: E402


def test_recall_at_4_on_the_generated_corpus(tmp_path, minilm):
    docs, questions = corpus(200)
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    model = edgellm.load(minilm["int8"])
    with Index(tmp_path / "index.sqlite") as index:
        index.add([tmp_path], model)
        assert sum(n for _, n in index.documents()) == 200
        found = [any(Path(h.path).name == name and h.heading == heading for h in retrieve(index, model, q, k=4))
                 for q, name, heading in questions]
    assert len(found) == 120 and sum(found) / len(found) >= 0.9


def test_benchmark_prints_its_table_and_json(tmp_path, minilm):
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, str(BENCH / "retrieval.py"), "--embedding", str(minilm["int8"]),
                          "--sizes", "125,200", "--real-up-to", "125", "--queries", "8", "--no-sqlite-vec",
                          "--work", str(tmp_path / "w"), "--json", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    assert [r["chunks"] for r in results["sizes"].values()] == [125, 200]
    assert results["sizes"]["200"]["real_chunks"] == 125 and "recall@4" in run.stdout
    assert all(r["total_ms"] > 0 and 0 <= r["recall_at_k"] <= 1 for r in results["sizes"].values())

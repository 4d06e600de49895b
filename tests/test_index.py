"""The local document index: chunking by structure, incremental updates, search, the CLI, and a
real SIGKILL during indexing leaving the index as it was before the document being written."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgellm
from edgellm.errors import RetrievalError
from edgellm.export.api import export_model
from edgellm.export.config import QuantConfig
from edgellm.retrieval.chunking import MAX_CHARS, chunk_text, read_chunks
from edgellm.retrieval.index import Index, retrieve
from embedding_helpers import make_tiny_bert

MANUAL = """Safety first.

# Pumps
Pumps move water.

## Cavitation
Bubbles form when suction pressure drops.
They collapse and pit the impeller.

Raise the suction head.

```
# a comment in code, not a heading
```

## Seals
A leaking seal drips at the shaft.
# Motors
""" + "The motor trips its relay when hot. " * 40


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-encoder")
    export_model(make_tiny_bert(root / "hf"), root / "bundle", quant=QuantConfig(weights="fp32"), evaluate=False)
    return root / "bundle"


def test_markdown_chunks_follow_headings_and_keep_positions():
    chunks = list(chunk_text(MANUAL))
    assert [c.heading for c in chunks[:4]] == ["", "Pumps", "Pumps > Cavitation", "Pumps > Seals"]
    assert chunks[2].line == 7 and "a comment in code" in chunks[2].text  # a fenced '#' is no heading
    assert all(c.heading == "Motors" and len(c.text) <= MAX_CHARS for c in chunks[4:]) and len(chunks) > 5
    for c in chunks:
        assert MANUAL[c.start:c.end].startswith(c.text[:30]) and MANUAL[c.start:c.end].endswith(c.text[-30:])
        assert MANUAL.splitlines()[c.line - 1].strip() in c.text or c.heading == "Motors"
    plain = list(chunk_text("one\n\ntwo\n# not a heading", markdown=False))
    assert [c.heading for c in plain] == [""] and plain[0].text == "one\n\ntwo\n# not a heading"


def _pdf(pages: list[str]) -> bytes:
    """A minimal PDF, one line of Helvetica text a page."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       f"/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(len(objects))
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    table = f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n" + "".join(f"{o:010d} 00000 n \n" for o in offsets)
    return out + f"{table}trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{len(out)}\n%%EOF\n".encode()


def test_pdf_text_is_chunked_by_page(tmp_path):
    (tmp_path / "m.pdf").write_bytes(_pdf(["Pump cavitation pits the impeller.", "Motor heat trips the relay."]))
    chunks = read_chunks(tmp_path / "m.pdf")
    assert [(c.heading, c.line, c.text) for c in chunks] == [
        ("page 1", 1, "Pump cavitation pits the impeller."), ("page 2", 2, "Motor heat trips the relay.")]
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 nothing else")
    with pytest.raises(RetrievalError, match="bad.pdf: not a readable PDF"):
        read_chunks(tmp_path / "bad.pdf")


def test_unreadable_documents_are_one_line_errors(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(RetrievalError, match="bad.txt: not UTF-8"):
        read_chunks(tmp_path / "bad.txt")


def test_incremental_add_change_delete_and_search(tmp_path, encoder):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "manual.md").write_text(MANUAL)
    (docs / "notes.txt").write_text("valve seal pressure\n\nfan belt")
    (docs / "image.png").write_bytes(b"\x89PNG")  # not a document: skipped
    (docs / "latin1.txt").write_bytes(b"caf\xe9")  # unreadable: reported, the others indexed
    model = edgellm.load(encoder)
    with Index(tmp_path / "index.sqlite") as index:
        first = index.add([docs], model)
        assert [(Path(c.path).name, c.action) for c in first] == [
            ("latin1.txt", "failed"), ("manual.md", "added"), ("notes.txt", "added")]
        assert "latin1.txt: not UTF-8 text (byte 3)" in first[0].error
        (docs / "latin1.txt").unlink()
        assert [c.action for c in index.add([docs], model)] == ["unchanged", "unchanged"]
        (docs / "notes.txt").write_text("oil filter")
        (docs / "manual.md").unlink()
        changes = {Path(c.path).name: c.action for c in index.add([docs], model)}
        assert changes == {"notes.txt": "updated", "manual.md": "removed"}
        assert [(Path(p).name, n) for p, n in index.documents()] == [("notes.txt", 1)]
        hits = retrieve(index, model, "oil filter", k=4)
        assert len(hits) == 1 and hits[0].text == "oil filter" and hits[0].score > 0.999
        assert [c.action for c in index.remove([docs / "notes.txt"])] == ["removed"] and index.documents() == []
    assert sqlite3.connect(tmp_path / "index.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_search_finds_the_chunk_it_was_given(tmp_path, encoder):
    model = edgellm.load(encoder)
    (tmp_path / "m.md").write_text(MANUAL)
    with Index(tmp_path / "i.sqlite") as index:
        index.add([tmp_path / "m.md"], model)
        for chunk in read_chunks(tmp_path / "m.md")[:4]:
            best = index.search(model.embed(chunk.embedded_text())[0], k=2)[0]
            assert (best.heading, best.line, best.text) == (chunk.heading, chunk.line, chunk.text)
        with pytest.raises(RetrievalError, match="k must be"):
            index.search(model.embed("x")[0], k=0)


def test_another_embedding_model_is_refused(tmp_path, encoder):
    other = tmp_path / "other"
    export_model(make_tiny_bert(tmp_path / "hf2", seed=1), other, quant=QuantConfig(weights="fp32"), evaluate=False)
    (tmp_path / "a.txt").write_text("pump")
    with Index(tmp_path / "i.sqlite") as index:
        index.add([tmp_path / "a.txt"], edgellm.load(encoder))
        with pytest.raises(RetrievalError, match="built with embedding model 'bundle', not 'other'"):
            retrieve(index, edgellm.load(other), "pump")


def test_cli_add_search_list_remove(tmp_path, encoder):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "manual.md").write_text(MANUAL)
    index = tmp_path / "i.sqlite"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgellm.cli", "index", *args], capture_output=True, text=True,
                              timeout=120)

    new = cli("search", str(index), "pump")
    assert new.returncode == 1 and "no such index" in new.stderr
    added = cli("add", str(index), str(tmp_path / "docs"), "--embedding", str(encoder))
    assert added.returncode == 0 and f"added {tmp_path / 'docs' / 'manual.md'}" in added.stdout
    hits = json.loads(cli("search", str(index), "Bubbles form when suction pressure drops.", "-k", "2",
                          "--json").stdout)  # the bundle remembered by the index
    assert len(hits) == 2 and {"path", "heading", "line", "start", "end", "text", "score"} <= set(hits[0])
    assert str(tmp_path / "docs" / "manual.md") in cli("list", str(index)).stdout
    assert "removed" in cli("remove", str(index), str(tmp_path / "docs")).stdout
    assert cli("list", str(index)).stdout == ""


def _large(seed: int, paragraphs: int = 3000) -> str:
    rng = random.Random(seed)
    words = "pump motor bearing wear vibration heat sensor valve seal pressure flow alarm".split()
    return "\n\n".join(f"## Part {i}\n\n" + " ".join(rng.choice(words) for _ in range(120)) + "."
                       for i in range(paragraphs))


def _state(index_path: Path) -> dict[str, tuple[str, int]]:
    db = sqlite3.connect(index_path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT d.path, d.sha256, count(c.id) FROM documents d LEFT JOIN chunks c ON c.document = d.id "
                      "GROUP BY d.id").fetchall()
    db.close()
    return {Path(p).name: (sha, n) for p, sha, n in rows}


@pytest.mark.timeout(300)
def test_sigkill_while_indexing_leaves_the_document_as_before(tmp_path, encoder):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("first version of a")
    (docs / "b.md").write_text(_large(1))
    index = tmp_path / "i.sqlite"
    cmd = [sys.executable, "-m", "edgellm.cli", "index", "add", str(index), str(docs), "--embedding", str(encoder)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=200)
    before = _state(index)
    (docs / "a.md").write_text("second version of a")
    (docs / "b.md").write_text(_large(2))
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = process.stdout.readline()  # a.md is written; b.md is read, then chunked and embedded (~1 s)
    time.sleep(0.3)  # inside b.md's embedding: ~3,000 chunks take a second or more, reading it milliseconds
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    assert line.startswith(f"updated {docs / 'a.md'}") and process.returncode == -signal.SIGKILL
    after = _state(index)
    assert after["a.md"] == (hashlib.sha256(b"second version of a").hexdigest(), 1)
    assert after["b.md"] == before["b.md"]  # b.md's old chunks, all of them, as before
    db = sqlite3.connect(index)
    old_text = db.execute("SELECT text FROM chunks c JOIN documents d ON d.id = c.document WHERE d.path LIKE '%b.md' "
                          "ORDER BY seq LIMIT 1").fetchone()[0]
    assert old_text in _large(1) and old_text not in _large(2)
    db.close()
    subprocess.run(cmd, check=True, capture_output=True, timeout=200)  # the next run finishes the job
    assert _state(index)["b.md"] == (hashlib.sha256(_large(2).encode()).hexdigest(), len(read_chunks(docs / "b.md")))

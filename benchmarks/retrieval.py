"""Retrieval: recall@k on a generated corpus, and latency (embed the query, search, total) and
memory at 1k, 10k and 100k chunks.

    python benchmarks/retrieval.py [--embedding DIR] [--sizes 1000,10000,100000] [--k 4] [--queries 60]
                                   [--real-up-to 10000] [--work DIR] [--json PATH]

The corpus: one maintenance manual per machine, a section per fault whose text says the fault's
symptoms and remedy, padded with general sections (logbook, safety, schedules) to the size asked.
Each question paraphrases one fault section's symptoms for one machine, so its answer is in one
known section (manual, heading); recall@k is the share of questions whose section is among the k
hits. Chunks up to `--real-up-to` are real text embedded by the bundle; beyond it, filler vectors
are the real filler's vectors plus noise (embedding 100k chunks would take longer than the rest of
the run), so recall at 100k is measured against 90k synthetic neighbours. Latency is the median
over the questions, each embedded alone. Memory: the process's RSS growth while loading the
index's matrix, and the index file's size. Where apsw and sqlite-vec are installed, the same
vectors are also searched through sqlite-vec's vec0 table (the stdlib sqlite3 of many Pythons
cannot load extensions), for the choice recorded in edgellm/retrieval/index.py.
Progress on stderr; the table and bars on stdout.
"""
from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

BARS = {"recall_at_k": 0.9, "total_ms_100k": 50.0}
MACHINES = ["centrifugal pump", "air compressor", "conveyor belt", "steam boiler", "cooling tower fan",
            "hydraulic press", "induction motor", "gearbox", "heat exchanger", "vacuum pump",
            "packaging robot", "chiller", "mixing tank agitator", "screw feeder", "diesel generator"]
# fault: (symptoms the manual writes, remedy, symptoms as a technician asks about them)
FAULTS = {
    "Cavitation": ("a crackling noise like gravel and pitting on the impeller, with suction pressure falling",
                   "raise the suction head and clear the inlet strainer",
                   "sounds like it is pumping gravel and the suction pressure keeps dropping"),
    "Bearing wear": ("rising vibration at the bearing housing and a growing rumble at running speed",
                     "grease the bearings and replace them when vibration passes the limit",
                     "vibrates more every week and rumbles near the bearing"),
    "Overheating": ("the casing temperature climbing above its band and the thermal relay tripping",
                    "clean the cooling fins, check the fan and reduce the load",
                    "is running far too hot and keeps tripping on temperature"),
    "Overcurrent": ("the supply current well above nameplate and the breaker tripping on start",
                    "check the winding insulation and look for a jammed load",
                    "draws way more amps than it should and the breaker trips"),
    "Sensor dropout": ("readings that freeze or fall to zero while the machine is running",
                       "reseat the sensor connector and replace a damaged cable",
                       "shows zero on its sensor even though it is clearly running"),
    "Seal leak": ("fluid dripping along the shaft and a wet patch under the housing",
                  "replace the mechanical seal faces and check shaft alignment",
                  "is leaking fluid along the shaft onto the floor"),
    "Belt slip": ("a squeal on start-up and the driven speed lagging the motor",
                  "tension the belt to the specified deflection or replace a glazed belt",
                  "squeals when it starts and the output runs slow"),
    "Low pressure": ("discharge pressure below setpoint although the motor runs normally",
                     "check the relief valve setting and look for leaks downstream",
                     "cannot reach its pressure setpoint even with the motor fine"),
}
FILLER = ["Record the {w} reading in the logbook at the start of every shift.",
          "Wear gloves and eye protection when you open the {w} cover.",
          "The {w} inspection is due every {n} operating hours.",
          "Keep the area around the {w} free of tools and spare parts.",
          "Lock out the power supply before any work on the {w}.",
          "Order spare {w} parts through the plant store with the asset number.",
          "Train new operators on the {w} procedure before they work alone.",
          "A checklist for the {w} hangs next to the control panel."]
WORDS = ["filter", "guard", "terminal", "panel", "coupling", "flange", "gauge", "valve", "hose", "bracket",
         "enclosure", "label", "ladder", "cable tray", "drain", "vent", "housing", "mount"]


def corpus(chunks: int, seed: int = 0) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """({file name: Markdown}, [(question, file name, heading)]) with about `chunks` chunks."""
    rng = random.Random(seed)
    docs: dict[str, list[str]] = {}
    questions = []
    for machine in MACHINES:
        name = machine.replace(" ", "-") + ".md"
        title = machine.capitalize()
        parts = [f"# {title} maintenance manual\n"]
        for fault, (symptoms, remedy, asked) in FAULTS.items():
            parts.append(f"## {fault}\n\nOn the {machine}, {fault.lower()} shows as {symptoms}. To fix it, {remedy}.\n")
            questions.append((f"The {machine} {asked}. What should I check?", name, f"{title} maintenance manual > "
                                                                                     f"{fault}"))
        docs[name] = parts
    made = len(questions)
    section = 0
    while made < chunks:  # general sections, one chunk each, spread over the manuals
        name = rng.choice(list(docs))
        sentences = " ".join(rng.choice(FILLER).format(w=rng.choice(WORDS), n=rng.choice([250, 500, 1000]))
                             for _ in range(3))
        docs[name].append(f"## General note {section}\n\n{sentences}\n")
        section += 1
        made += 1
    return {name: "\n".join(parts) for name, parts in docs.items()}, questions


def recall(index: Any, model: Any, questions: list[tuple[str, str, str]], k: int) -> tuple[float, dict[str, float]]:
    """recall@k, and recall@1 and the median latencies (ms) of embedding each question and searching."""
    hits, firsts, embed_ms, search_ms = 0, 0, [], []
    for question, name, heading in questions:
        start = time.perf_counter()
        vector = model.embed([question])[0]
        middle = time.perf_counter()
        found = index.search(vector, k)
        end = time.perf_counter()
        embed_ms.append((middle - start) * 1000)
        search_ms.append((end - middle) * 1000)
        right = [Path(h.path).name == name and h.heading == heading for h in found]
        hits += any(right)
        firsts += bool(right) and right[0]
    times = {"recall_at_1": firsts / len(questions), "embed_ms": statistics.median(embed_ms), "search_ms": statistics.median(search_ms),
             "total_ms": statistics.median(e + s for e, s in zip(embed_ms, search_ms))}
    return hits / len(questions), times


def _rss_mb() -> float:
    for line in open("/proc/self/status", encoding="utf-8"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pad(index_path: Path, target: int, rng: np.random.Generator) -> None:
    """Synthetic filler chunks (noisy copies of real filler vectors) up to `target` chunks."""
    db = sqlite3.connect(index_path)
    real = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
    rows = db.execute("SELECT vector FROM chunks c JOIN documents d ON d.id = c.document "
                      "WHERE c.heading LIKE '%General note%'").fetchall()
    base = np.stack([np.frombuffer(r[0], np.float32) for r in rows])
    with db:
        cur = db.execute("INSERT INTO documents(path, sha256, size) VALUES ('synthetic', '', 0)")
        for start in range(0, target - real, 10_000):
            n = min(10_000, target - real - start)
            v = base[rng.integers(0, len(base), n)] + rng.normal(0, 0.03, (n, base.shape[1])).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            db.executemany('INSERT INTO chunks(document, seq, heading, line, start, "end", text, vector) '
                           'VALUES (?, ?, ?, 0, 0, 0, ?, ?)',
                           ((cur.lastrowid, start + i, "synthetic", "", v[i].tobytes()) for i in range(n)))
    db.close()


def sqlite_vec_ms(index_path: Path, queries: np.ndarray, k: int) -> float | None:
    """Median query time of the same vectors in a sqlite-vec vec0 table (apsw loads the extension)."""
    try:
        import apsw
        import sqlite_vec
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        db = apsw.Connection(str(Path(tmp) / "vec.db"))
        db.enable_load_extension(True)
        db.load_extension(sqlite_vec.loadable_path())
        src = sqlite3.connect(index_path)
        width = len(src.execute("SELECT vector FROM chunks LIMIT 1").fetchone()[0]) // 4
        db.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{width}] distance_metric=cosine)")
        with db:
            db.executemany("INSERT INTO v(rowid, embedding) VALUES (?, ?)", src.execute("SELECT id, vector FROM chunks"))
        src.close()
        times = []
        for q in queries:
            start = time.perf_counter()
            db.execute("SELECT rowid, distance FROM v WHERE embedding MATCH ? AND k = ?", (q.tobytes(), k)).fetchall()
            times.append((time.perf_counter() - start) * 1000)
        db.close()
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import edgellm
    from edgellm.retrieval.index import Index

    model = edgellm.load(args.embedding)
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"machine": report.machine_info(), "embedding": str(args.embedding), "k": args.k,
                               "sizes": {}}
    report.warn_if_busy(results["machine"])
    real_size = min(max(args.sizes), args.real_up_to)
    docs, questions = corpus(real_size)
    questions = random.Random(1).sample(questions, min(args.queries, len(questions)))
    work = Path(args.work or tempfile.mkdtemp(prefix="edgellm-retrieval-"))
    for size in sorted(args.sizes):
        folder = work / f"docs-{min(size, real_size)}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in corpus(min(size, real_size))[0].items():
            (folder / name).write_text(text, encoding="utf-8")
        path = work / f"index-{size}.sqlite"
        path.unlink(missing_ok=True)
        real_index = work / f"index-{real_size}.sqlite"
        report.stage(f"{size} chunks: indexing")
        start = time.perf_counter()
        if size > real_size and real_size in args.sizes:  # the real chunks are indexed already: a copy
            shutil.copyfile(real_index, path)
        else:
            with Index(path) as index:
                index.add([folder], model)
        add_s = time.perf_counter() - start
        if size > real_size:
            pad(path, size, rng)
        with Index(path) as index:
            before = _rss_mb()
            chunks = len(index._vectors()[1])
            grown = _rss_mb() - before
            at_k, times = recall(index, model, questions, args.k)
        query_vectors = model.embed([q for q, _, _ in questions])
        vec_ms = sqlite_vec_ms(path, query_vectors, args.k) if args.compare_sqlite_vec else None
        results["sizes"][str(size)] = {"chunks": chunks, "real_chunks": min(size, real_size), "index_s": add_s,
                                       "recall_at_k": at_k, **times, "sqlite_vec_search_ms": vec_ms,
                                       "matrix_rss_mb": grown, "file_mb": path.stat().st_size / 1e6}
        report.stage(f"{size} chunks: recall@{args.k} {at_k:.3f}, total {times['total_ms']:.1f} ms")
    return results


def table(results: dict[str, Any]) -> str:
    rows = [("chunks", "real", f"recall@{results['k']}", "recall@1", "embed ms", "search ms", "total ms", "vec0 search ms",
             "matrix MB", "file MB", "index s")]
    for size, r in results["sizes"].items():
        vec = "—" if r["sqlite_vec_search_ms"] is None else f"{r['sqlite_vec_search_ms']:.1f}"
        rows.append((str(r["chunks"]), str(r["real_chunks"]), f"{r['recall_at_k']:.3f}", f"{r['recall_at_1']:.3f}",
                     f"{r['embed_ms']:.1f}",
                     f"{r['search_ms']:.2f}", f"{r['total_ms']:.1f}", vec, f"{r['matrix_rss_mb']:.0f}",
                     f"{r['file_mb']:.0f}", f"{r['index_s']:.1f}"))
    return "\n".join(report.grid(rows))


def bars(results: dict[str, Any]) -> str:
    sizes = results["sizes"]
    lines = [f"{'PASS' if r['recall_at_k'] >= BARS['recall_at_k'] else 'FAIL'} recall@{results['k']} at {s} chunks: "
             f"{r['recall_at_k']:.3f} (bar >= {BARS['recall_at_k']})" for s, r in sizes.items()]
    if "100000" in sizes:
        total = sizes["100000"]["total_ms"]
        lines.append(f"{'PASS' if total <= BARS['total_ms_100k'] else 'FAIL'} query over 100k chunks: {total:.1f} ms "
                     f"(bar <= {BARS['total_ms_100k']:.0f} ms)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedding", type=Path, required=True, help="embedding bundle (edgellm export "
                                                                      "all-minilm-l6-v2 -o DIR --quant int8)")
    parser.add_argument("--sizes", default="1000,10000,100000",
                        type=lambda text: [int(s) for s in text.split(",")], help="chunk counts")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--queries", type=int, default=60, help="questions asked at each size")
    parser.add_argument("--real-up-to", type=int, default=10_000, help="chunks of real embedded text; synthetic "
                                                                        "vectors beyond")
    parser.add_argument("--no-sqlite-vec", dest="compare_sqlite_vec", action="store_false",
                        help="skip the sqlite-vec comparison")
    parser.add_argument("--work", type=Path, help="folder for the corpus and index files (default: a temporary one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = run(args)
    report.emit(results, table(results), bars(results), args.json)


if __name__ == "__main__":
    main()

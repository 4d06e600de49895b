"""Retrieved chunks as numbered sources in the chat, and the answer's citations as data; the CLI's
`run --index` end to end on a tiny generative bundle and a tiny encoder's index."""
from __future__ import annotations

from edgellm.cli.main import main
from edgellm.export.api import export_model
from edgellm.export.config import QuantConfig
from edgellm.retrieval.grounding import INSTRUCTION, ground, last_user_text, mark_cited
from edgellm.retrieval.index import Hit
from embedding_helpers import make_tiny_bert

HITS = [Hit(0.8, "/m/pumps.md", "Pumps > Cavitation", 7, 40, 90, "Bubbles pit the impeller.", 3),
        Hit(0.5, "/m/notes.txt", "", 1, 0, 10, "Oil filter.", 9)]


def test_sources_join_the_system_turn_numbered():
    asked = [{"role": "user", "content": "Why is the impeller pitted?"}]
    messages, citations = ground(asked, HITS)
    assert messages[1] == asked[0] and messages[0]["role"] == "system"
    assert messages[0]["content"] == (f"{INSTRUCTION}\n\n[1] pumps.md, Pumps > Cavitation\nBubbles pit the impeller."
                                      f"\n\n[2] notes.txt\nOil filter.")
    assert [c.to_dict() for c in citations][0] == {"n": 1, "chunk": 3, "path": "/m/pumps.md",
                                                   "heading": "Pumps > Cavitation", "line": 7, "start": 40, "end": 90,
                                                   "score": 0.8, "cited": False}
    with_system, _ = ground([{"role": "system", "content": "Be brief."}, *asked], HITS)
    assert len(with_system) == 2 and with_system[0]["content"].startswith(f"Be brief.\n\n{INSTRUCTION}")
    assert ground(asked, []) == (asked, [])
    assert [c.cited for c in mark_cited("Cavitation [1], see also [7].", citations)] == [True, False]
    assert last_user_text([*asked, {"role": "assistant", "content": "?"}]) == "Why is the impeller pitted?"


def test_run_answers_from_an_index_and_lists_its_sources(tmp_path, tiny_bundle, capsys):
    encoder = tmp_path / "encoder"
    export_model(make_tiny_bert(tmp_path / "hf"), encoder, quant=QuantConfig(weights="fp32"), evaluate=False)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "pumps.md").write_text("# Pumps\n\n## Cavitation\nBubbles pit the impeller.\n\n"
                                                "## Seals\nA leaking seal drips.\n")
    index = tmp_path / "i.sqlite"
    assert main(["index", "add", str(index), str(tmp_path / "docs"), "--embedding", str(encoder)]) == 0
    capsys.readouterr()
    assert main(["run", str(tiny_bundle), "pump impeller", "--index", str(index), "--sources", "2", "-n", "3"]) == 0
    out = capsys.readouterr().out
    listed = out.split("sources:\n", 1)[1].splitlines()
    assert len(listed) == 2 and {line.rsplit("  ", 1)[1] for line in listed} == {"Pumps > Cavitation", "Pumps > Seals"}
    assert all(line.startswith(("[1]", "[2]")) and f"{tmp_path / 'docs' / 'pumps.md'}:" in line for line in listed)
    assert main(["run", str(tiny_bundle), "x", "--index", str(index), "--raw"]) == 1
    assert "cannot go with --raw" in capsys.readouterr().err
    assert main(["run", str(tiny_bundle), "x", "--index", str(tmp_path / "none.sqlite")]) == 1
    assert "no such index" in capsys.readouterr().err

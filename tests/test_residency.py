"""A loaded bundle's file pages leave the resident set while the graph loads and as it runs, and
nothing written through a mapping is ever lost doing so (edgellm.runtime.residency)."""
from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import pytest

import edgellm
from edgellm.export.api import export_model
from edgellm.runtime import residency
from edgellm.runtime.residency import MappedWeights
from gguf_writer import write_tiny_gguf
from test_export_size import QTYPES, SHAPE, _resident

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux: reads /proc/self/smaps")
PAGE = mmap.PAGESIZE


def _pageout_works(path: Path) -> bool:
    """MADV_PAGEOUT drops clean file pages on a disk filesystem (not tmpfs without swap, not before Linux 5.4)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        m[:]
        before = _resident(path.parent)
        residency._advise(residency._mapped(str(path.parent.resolve()) + os.sep), residency._MADV_PAGEOUT)
        return _resident(path.parent) < before


def test_loading_pages_out_what_is_read_and_keeps_what_was_written(tmp_path):
    """The sweep runs while onnxruntime maps, unmaps and allocates, so it must never drop data:
    a page written through a private mapping (as a copy on write) keeps its bytes; the pages
    only read leave the resident set."""
    root = tmp_path / "bundle"
    root.mkdir()
    data = os.urandom(64 * PAGE)
    (root / "w.data").write_bytes(data)
    mapped = MappedWeights(root)
    fh = open(root / "w.data", "rb")
    private = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        with mapped.loading():
            private[:4] = b"edge"  # this page is now the process's own copy
            assert private[:] == b"edge" + data[4:]  # every page read
            time.sleep(10 * residency.SWEEP_S)
            assert private[:4] == b"edge"
        assert private[:] == b"edge" + data[4:]  # nothing lost, every byte as it was
        # A mapping with a written page is not recorded for the later releases either.
        assert mapped.spans == []
        if _pageout_works(root / "w.data"):
            with mapped.loading():
                private[PAGE:]  # read the rest again
                time.sleep(10 * residency.SWEEP_S)
            assert _resident(root) <= 16 * PAGE  # the written page and what faulted back since
    finally:
        private.close()
        fh.close()


def test_pages_a_gather_brings_back_are_dropped_again_as_it_runs(tiny_hf, tmp_path):
    """After load only onnxruntime's own, never-written mappings are recorded; the pages read
    through them later (a tied table's gathered rows, whole page-cache folios at a time) are
    dropped every RELEASE_EVERY runs, and the model still answers as before."""
    path = write_tiny_gguf(tiny_hf("llama", **SHAPE), tmp_path / "m.gguf", QTYPES)
    bundle = tmp_path / "b"
    export_model(path, bundle, evaluate=False, max_context=64)
    model = edgellm.load(bundle)
    first = model.generate([5, 17, 33], max_new_tokens=4, temperature=0).token_ids
    (mapped,) = [m for m in MappedWeights._loaded if m.prefix == str(bundle.resolve()) + os.sep]
    assert mapped.spans and _resident(bundle) <= 64 * PAGE
    for start, end in mapped.spans:  # read every mapped page, as a long run of rows would
        ctypes.string_at(start, end - start)
    assert _resident(bundle) >= sum(end - start for start, end in mapped.spans)
    for _ in range(residency.RELEASE_EVERY):
        MappedWeights.tick()
    assert _resident(bundle) == 0
    assert model.generate([5, 17, 33], max_new_tokens=4, temperature=0).token_ids == first

"""What of a bundle stays resident: the heap onnxruntime frees and the file pages it leaves mapped.

onnxruntime maps a bundle's external weights (private file mappings) and prepacks each
MatMulNBits weight into a copy of its own. Prepacking reads every page of the file, and those
pages count in the process's resident set until their mapping goes; a mapping stays while
another node reads the weight (a tied embedding's Gather on lm_head's table; on x86 the packed
scales). Later a Gather of a few rows maps whole page-cache folios around them: 1 MB more a
token on the Qwen2.5-0.5B shape, up to a second copy of the table beside the packed one.

While the graph loads, onnxruntime maps, unmaps and allocates, so the pages are paged out
(MADV_PAGEOUT), which never loses data: a page written through a private mapping, or an
anonymous one that took a freed range's address, is swapped or left alone. Once loaded, the
mappings with no page written (smaps' `Anonymous: 0`) are recorded and their pages dropped
(MADV_DONTNEED) then and every RELEASE_EVERY graph runs: they stay in the page cache, and
the rows a Gather reads come back without a disk read. Linux only; elsewhere nothing is done.
"""
from __future__ import annotations

import ctypes
import os
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21  # Linux 5.4
SWEEP_S = 0.002  # while a graph loads, how often its mapped pages are paged out (see MappedWeights.loading)
RELEASE_EVERY = 64  # graph runs between two releases of every loaded bundle's pages


def release_freed_heap() -> None:
    """Return the heap that onnxruntime freed while loading to the operating system.

    Prepacking copies each MatMulNBits weight into the kernel's layout and frees the
    staging buffers; glibc keeps such memory (26 MB for SmolLM2) unless asked, and on
    a 1 GB board that is memory the KV cache could use.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows): nothing kept
        return
    trim(0)


def _mapped(prefix: str, smaps: bool = False) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files under `prefix`: all of them
    (/proc/self/maps, about 1 ms), or with `smaps` those with no page written through them
    (/proc/self/smaps walks every page table: tens of ms)."""
    try:
        text = Path("/proc/self/smaps" if smaps else "/proc/self/maps").read_text()
    except OSError:
        return []
    spans: list[tuple[int, int]] = []
    span = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0]:
            span = None
            if len(fields) >= 6 and fields[5].startswith(prefix):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                span = (start, end)
                if not smaps:
                    spans.append(span)
        elif span and fields[0] == "Anonymous:":
            if fields[1] == "0":
                spans.append(span)
            span = None
    return spans


def _advise(spans: list[tuple[int, int]], advice: int) -> int:
    """madvise each span; the bytes of those it took."""
    if not spans:  # no /proc (macOS, Windows): nothing mapped that this module can see
        return 0
    try:
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError, TypeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(end - start for start, end in spans if madvise(start, end - start, advice) == 0)


class MappedWeights:
    """A loaded bundle's weight files as this process maps them, given back while the graph
    loads (`loading`) and every RELEASE_EVERY graph runs after (`tick`, from the runner)."""

    _loaded: "weakref.WeakSet[MappedWeights]" = weakref.WeakSet()
    _runs = 0

    def __init__(self, root: Path) -> None:
        self.prefix = str(Path(root).resolve()) + os.sep
        self.spans: list[tuple[int, int]] = []  # unwritten mappings, recorded once loaded

    @contextmanager
    def loading(self) -> Iterator[None]:
        """Page out what prepacking reads while onnxruntime opens the graph, not after: it would
        otherwise all be resident at once beside the packed copies (the load's peak). A file the
        checksums just read is in the page cache, so prepacking reads it at memory speed: every
        SWEEP_S it maps tens of MB. Verified load peaks, 5 ms -> 2 ms: Qwen2.5-0.5B Q4_0 shape
        623-629 -> 604-611 MB, Llama-3.2-1B Q4_0 1,376 -> 1,261 MB (load time the same, 1.7-3.6 s)."""
        done = threading.Event()

        def sweep() -> None:
            while not done.wait(SWEEP_S):
                _advise(_mapped(self.prefix), _MADV_PAGEOUT)

        thread = threading.Thread(target=sweep, name="edgellm-page-out", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
        self.spans = _mapped(self.prefix, smaps=True)
        self.release()
        MappedWeights._loaded.add(self)

    def release(self) -> int:
        """Drop the resident pages of the recorded mappings still mapped as they were."""
        current = set(_mapped(self.prefix))
        return _advise([span for span in self.spans if span in current], _MADV_DONTNEED)

    @classmethod
    def tick(cls) -> None:
        """Count one graph run; every RELEASE_EVERY-th releases every loaded bundle's pages."""
        cls._runs += 1
        if cls._runs % RELEASE_EVERY == 0:
            for mapped in list(cls._loaded):
                mapped.release()

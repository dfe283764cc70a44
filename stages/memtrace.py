"""Where a stage's memory grows: glibc's heap figures always, the Python lines that grow it on demand.

``malloc_figures()`` is glibc's own account of its heap (``mallinfo2``: bytes in use, bytes free inside the heap,
bytes in separate mappings), in every stage's statistics. It tells a leak from fragmentation: a soak that sees a
process's PSS climb while "in use" stays flat and "free" climbs is looking at a heap that holes keep from
shrinking, not at memory kept alive.

On demand, ``SIPBRIDGE_TRACEMALLOC_S=600`` in a stage's environment:

A soak (``sipbridge bench soak``) tells that a process grows; this tells which lines of Python allocate what it
keeps. With the variable set, the stage starts ``tracemalloc`` at start-up, takes its baseline after one interval
(the start-up's caches and pools are not a leak), and then every interval logs the allocation sites that grew the
most since the baseline, each with its call stack. Tracing slows allocation (a few tens of percent in the media
stages), so it is off unless asked for, and memory outside the Python heap (FFmpeg's buffers, libvpx, the Chromium
processes) is not seen: a process that grows while its traced heap does not grows there.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import time
import tracemalloc
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

TRACEMALLOC_ENV = "SIPBRIDGE_TRACEMALLOC_S"
# Frames kept per allocation: enough to see the caller in our code above a library's allocating line.
TRACE_FRAMES = 8
TOP_SITES = 8
# Below this an interval makes snapshots (hundreds of milliseconds on a busy stage) a load of their own.
MIN_INTERVAL_S = 10.0
BYTES_PER_KIB = 1024


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33), every field a size_t in bytes or a count."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2() -> Any:
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc, or a glibc before 2.33: no figures, not an error
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


def malloc_figures() -> dict[str, int] | None:
    """glibc's heap, summed over its arenas, in KiB: ``heap_kb`` taken from the system for the heap, ``in_use_kb``
    handed out, ``free_kb`` free inside the heap (fragmentation, or room to grow), ``mmapped_kb`` in separate
    mappings (large blocks; returned to the system when freed). None where the C library has no mallinfo2."""
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return {"heap_kb": info.arena // BYTES_PER_KIB, "in_use_kb": info.uordblks // BYTES_PER_KIB,
            "free_kb": info.fordblks // BYTES_PER_KIB, "mmapped_kb": info.hblkhd // BYTES_PER_KIB}


# Keeping a heap from creeping (processes that carry frames of every size through Python: the browser and janus
# stages). Frames of tens to hundreds of kB, allocated and freed on two threads, fragment glibc's heap: the live
# heap stays flat while its free part, and the PSS, creep up (issue 15: the browser stage ~0.3 MB/min, the janus
# stage 0.04 MB/min of free heap). Two glibc settings answer it: blocks from MMAP_THRESHOLD_BYTES up get their
# own mappings, given back when freed (a fixed threshold also stops glibc raising it to the largest block freed,
# which would send every later frame to the heap), and malloc_trim gives the heap's free pages back now and then.
M_MMAP_THRESHOLD = -3  # mallopt parameter, glibc's malloc.h
MMAP_THRESHOLD_BYTES = 64 * 1024
HEAP_TRIM_INTERVAL_S = 30.0


def map_large_buffers(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """glibc: serve allocations of ``threshold_bytes`` and more from their own mappings. False without glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))


def heap_trimmer() -> Callable[[], int] | None:
    """glibc's malloc_trim(0) (every free page of the heap back to the system) as a callable; None without glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


async def keep_heap_small(interval_s: float = HEAP_TRIM_INTERVAL_S) -> None:
    """Map large blocks, then trim the heap every ``interval_s`` until cancelled (a stage's task)."""
    map_large_buffers()
    trim = heap_trimmer()
    while trim is not None:
        await asyncio.sleep(interval_s)
        trim()


def interval_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> float | None:
    """The tracing interval asked for, or None (off). A value that is not a number of seconds >= MIN_INTERVAL_S is
    refused with a ValueError naming the variable: a diagnostic that silently does nothing wastes the soak."""
    raw = environ.get(TRACEMALLOC_ENV, "").strip()
    if not raw or raw == "0":
        return None
    try:
        interval_s = float(raw)
    except ValueError:
        raise ValueError(f"{TRACEMALLOC_ENV}={raw!r}: not a number of seconds") from None
    if not interval_s >= MIN_INTERVAL_S:
        raise ValueError(f"{TRACEMALLOC_ENV}={raw!r}: below {MIN_INTERVAL_S:.0f} s")
    return interval_s


class MemoryTrace:
    """Baseline after one interval, then the top growing sites every interval (see the module docstring)."""

    def __init__(self, interval_s: float, log: logging.LoggerAdapter[logging.Logger] | logging.Logger) -> None:
        self.interval_s = interval_s
        self.log = log
        self._baseline: tracemalloc.Snapshot | None = None
        self._next_s = time.monotonic() + interval_s
        if not tracemalloc.is_tracing():
            tracemalloc.start(TRACE_FRAMES)
        self.log.info("tracemalloc on: baseline in %.0f s, then growth every %.0f s", interval_s, interval_s)

    def due(self, now_s: float | None = None) -> bool:
        return (time.monotonic() if now_s is None else now_s) >= self._next_s

    def _snapshot(self) -> tracemalloc.Snapshot:
        # The snapshots themselves are allocated in tracemalloc.py: anywhere in the stack, not growth of ours.
        skip = [tracemalloc.Filter(False, tracemalloc.__file__, all_frames=True),
                tracemalloc.Filter(False, "<frozen importlib.*")]
        return tracemalloc.take_snapshot().filter_traces(skip)

    def step(self) -> list[str]:
        """Take the baseline or report growth since it; the lines logged (empty for the baseline)."""
        self._next_s = time.monotonic() + self.interval_s
        snapshot = self._snapshot()
        if self._baseline is None:
            self._baseline = snapshot
            traced_kib = tracemalloc.get_traced_memory()[0] / BYTES_PER_KIB
            self.log.info("tracemalloc baseline: %.0f KiB traced", traced_kib)
            return []
        # One comparison: every traced block is in exactly one traceback group, so their sum is the total.
        diffs = snapshot.compare_to(self._baseline, "traceback")
        total_kib = sum(s.size_diff for s in diffs) / BYTES_PER_KIB
        growth = [s for s in diffs if s.size_diff > 0][:TOP_SITES]
        lines = [f"tracemalloc: {total_kib:+.0f} KiB traced since the baseline; top growing sites:"]
        for stat in growth:
            frames = [f"{_short(f.filename)}:{f.lineno}" for f in stat.traceback]
            lines.append(f"  {stat.size_diff / BYTES_PER_KIB:+.0f} KiB in {stat.count_diff:+d} blocks at "
                         + " <- ".join(reversed(frames)))
        for line in lines:
            self.log.info("%s", line)
        return lines


def _short(filename: str) -> str:
    """A source path without the interpreter's or the virtualenv's prefix: what a reader needs to find it."""
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in filename:
            tail = filename.rsplit(marker, 1)[-1]
            return tail if marker == "/site-packages/" else tail.split("/", 1)[-1]
    return filename

"""SIPBRIDGE_TRACEMALLOC_S: a stage says which Python lines its heap grows at, or refuses a wrong value."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from stages import memtrace
from tests.stagehelp import stage_procs

KEPT_BLOCKS = 200
BLOCK_BYTES = 10_000


def test_interval_from_env() -> None:
    assert memtrace.interval_from_env({}) is None
    assert memtrace.interval_from_env({memtrace.TRACEMALLOC_ENV: "0"}) is None
    assert memtrace.interval_from_env({memtrace.TRACEMALLOC_ENV: "600"}) == 600.0
    with pytest.raises(ValueError, match=f"{memtrace.TRACEMALLOC_ENV}='ten'"):
        memtrace.interval_from_env({memtrace.TRACEMALLOC_ENV: "ten"})
    with pytest.raises(ValueError, match="below"):
        memtrace.interval_from_env({memtrace.TRACEMALLOC_ENV: "1"})
    with pytest.raises(ValueError, match="below"):
        memtrace.interval_from_env({memtrace.TRACEMALLOC_ENV: "nan"})


def keep_blocks(kept: list[bytes]) -> None:
    for i in range(KEPT_BLOCKS):
        kept.append(bytes([i % 256]) * BLOCK_BYTES)  # the line the report must name


def test_growth_after_the_baseline_is_reported_at_the_line_that_keeps_it(caplog: pytest.LogCaptureFixture) -> None:
    kept: list[bytes] = []
    keep_blocks(kept)  # before the baseline: start-up, not growth
    trace = memtrace.MemoryTrace(memtrace.MIN_INTERVAL_S, logging.getLogger("test"))
    try:
        assert not trace.due()
        assert trace.step() == []  # the baseline
        keep_blocks(kept)
        lines = trace.step()
    finally:
        import tracemalloc

        tracemalloc.stop()
    top = lines[1]
    grown_kib = KEPT_BLOCKS * BLOCK_BYTES / memtrace.BYTES_PER_KIB
    assert "test_memtrace.py" in top and f"test_memtrace.py:{keep_blocks.__code__.co_firstlineno + 2}" in top, lines
    reported_kib = float(top.split("KiB")[0])
    assert grown_kib <= reported_kib < 1.1 * grown_kib, lines
    blocks = int(top.split(" in ")[1].split(" blocks")[0])
    assert KEPT_BLOCKS <= blocks <= KEPT_BLOCKS + 2, lines  # the blocks, and the list's own array growing
    assert not any("tracemalloc.py" in line for line in lines), lines


def run_source_with_trace_env(run_dir: Path, value: str) -> tuple[int, str]:
    """A short source stage run with SIPBRIDGE_TRACEMALLOC_S set to ``value``: its exit code and its log."""
    os.environ[memtrace.TRACEMALLOC_ENV] = value
    try:
        with stage_procs(run_dir) as procs:
            procs.start("source", "source", "--frames", "10", "--width", "64", "--height", "48")
            return procs.wait_all()["source"], procs.log("source")
    finally:
        del os.environ[memtrace.TRACEMALLOC_ENV]


def test_a_stage_refuses_a_wrong_interval_and_exits_2(tmp_path: Path) -> None:
    code, log = run_source_with_trace_env(tmp_path, "often")
    assert code == 2, log
    assert f"{memtrace.TRACEMALLOC_ENV}='often': not a number of seconds" in log, log


def test_a_stage_traces_when_asked(tmp_path: Path) -> None:
    code, log = run_source_with_trace_env(tmp_path, "60")
    assert code == 0, log
    assert "tracemalloc on: baseline in 60 s" in log, log


HEAP_BLOCK_BYTES = 64 * 1024  # below glibc's mmap threshold: from the heap
HEAP_BLOCKS = 100


def test_malloc_figures_follow_what_the_heap_holds() -> None:
    before = memtrace.malloc_figures()
    if before is None:
        pytest.skip("this C library has no mallinfo2 (glibc >= 2.33)")
    held = [bytearray(HEAP_BLOCK_BYTES) for _ in range(HEAP_BLOCKS)]
    during = memtrace.malloc_figures()
    assert during is not None
    held_kib = HEAP_BLOCKS * HEAP_BLOCK_BYTES // memtrace.BYTES_PER_KIB
    assert during["in_use_kb"] - before["in_use_kb"] >= 0.9 * held_kib, (before, during)
    del held
    after = memtrace.malloc_figures()
    assert after is not None
    # Freed: no longer in use; what the heap kept of it is free inside it (or was given back to the system).
    assert during["in_use_kb"] - after["in_use_kb"] >= 0.9 * held_kib, (during, after)
    assert after["heap_kb"] - after["in_use_kb"] - after["free_kb"] <= 1, after


FRAGMENT_BLOCK_BYTES = 32 * 1024  # below any mmap threshold a stage sets: from the heap
FRAGMENT_BLOCKS = 800  # 25 MiB
KEEP_EVERY = 8  # the live blocks that hold the freed ones between them inside the heap


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_the_heap_trimmer_gives_the_pages_of_a_fragmented_heap_back() -> None:
    """Freed blocks between live ones stay resident (glibc gives back only the heap's top); a trim returns them."""
    trim = memtrace.heap_trimmer()
    if trim is None:
        pytest.skip("no glibc malloc_trim")
    trim()
    blocks = [bytearray(b"\x01") * FRAGMENT_BLOCK_BYTES for _ in range(FRAGMENT_BLOCKS)]
    live = blocks[KEEP_EVERY - 1::KEEP_EVERY]  # the last block too: the freed ones are not at the heap's top
    freed_bytes = (len(blocks) - len(live)) * FRAGMENT_BLOCK_BYTES
    del blocks
    before = _resident_bytes()
    trim()
    after = _resident_bytes()
    assert before - after >= freed_bytes // 2, (before, after, freed_bytes)
    assert len(live) == FRAGMENT_BLOCKS // KEEP_EVERY

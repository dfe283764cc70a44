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


def test_a_stage_refuses_a_wrong_interval_and_exits_2(tmp_path: Path) -> None:
    os.environ[memtrace.TRACEMALLOC_ENV] = "often"
    try:
        with stage_procs(tmp_path) as procs:
            procs.start("source", "source", "--frames", "10", "--width", "64", "--height", "48")
            codes = procs.wait_all()
            log = procs.log("source")
    finally:
        del os.environ[memtrace.TRACEMALLOC_ENV]
    assert codes == {"source": 2}, log
    assert f"{memtrace.TRACEMALLOC_ENV}='often': not a number of seconds" in log, log


def test_a_stage_traces_when_asked(tmp_path: Path) -> None:
    os.environ[memtrace.TRACEMALLOC_ENV] = "60"
    try:
        with stage_procs(tmp_path) as procs:
            procs.start("source", "source", "--frames", "10", "--width", "64", "--height", "48")
            codes = procs.wait_all()
            log = procs.log("source")
    finally:
        del os.environ[memtrace.TRACEMALLOC_ENV]
    assert codes == {"source": 0}, log
    assert "tracemalloc on: baseline in 60 s" in log, log

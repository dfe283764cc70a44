"""What the node reads about the host and its calls' processes from /proc (Linux only, no dependencies).

The host's CPU comes from /proc/stat (all cores together, so 1.0 means every core busy). A call's processes are
found by their session: each call's supervisord is started in a new session, its stages inherit that session id
(supervisord gives each program its own process group, not its own session), so one scan of /proc finds every
process of every call, whatever it spawned (Chromium's helpers included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def host_jiffies(proc: Path = PROC) -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot; idle and iowait count as not busy."""
    fields = [int(v) for v in (proc / "stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])  # guest time is already inside user/nice
    return total - idle, total


class CpuSampler:
    """Host CPU busy share (0..1 over all cores) between successive ``sample()`` calls."""

    def __init__(self, proc: Path = PROC) -> None:
        self.proc = proc
        self._last = host_jiffies(proc)
        self.busy_ratio = 0.0

    def sample(self) -> float:
        busy, total = host_jiffies(self.proc)
        d_busy, d_total = busy - self._last[0], total - self._last[1]
        self._last = (busy, total)
        if d_total > 0:
            self.busy_ratio = max(0.0, min(1.0, d_busy / d_total))
        return self.busy_ratio


@dataclass
class ProcInfo:
    pid: int
    session: int
    start_ticks: int  # since boot: a pid reused by another process has another start time
    cpu_ticks: int  # user + system


def _parse_stat(pid: int, text: str) -> ProcInfo | None:
    # The command name is in parentheses and may hold spaces or parentheses itself: split after the last ')'.
    close = text.rfind(")")
    if close < 0:
        return None
    rest = text[close + 2 :].split()
    # rest[0] is field 3 (state); session is field 6, utime 14, stime 15, starttime 22.
    try:
        return ProcInfo(pid, int(rest[3]), int(rest[19]), int(rest[11]) + int(rest[12]))
    except (IndexError, ValueError):
        return None


def scan_sessions(sessions: set[int], proc: Path = PROC) -> dict[int, list[ProcInfo]]:
    """The live processes of each of ``sessions`` (session id -> processes)."""
    found: dict[int, list[ProcInfo]] = {sid: [] for sid in sessions}
    if not sessions:
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            info = _parse_stat(int(entry.name), (entry / "stat").read_text())
        except OSError:
            continue  # ended while we looked
        if info is not None and info.session in found:
            found[info.session].append(info)
    return found


def pss_bytes(pid: int, proc: Path = PROC) -> int:
    """Proportional set size (shared pages split between their users), else resident size; 0 if gone."""
    try:
        for line in (proc / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int((proc / str(pid) / "statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


def still_same(info: ProcInfo, proc: Path = PROC) -> bool:
    """True while ``info.pid`` is the process we saw (not ended, not a new process with a reused pid)."""
    try:
        now = _parse_stat(info.pid, (proc / str(info.pid) / "stat").read_text())
    except OSError:
        return False
    return now is not None and now.start_ticks == info.start_ticks

"""Process-tree helpers: find the Chromium processes of a stage and measure their CPU time and PSS."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree = children_map()
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def chromium_pids(root_pid: int) -> list[int]:
    return [p for p in descendants(root_pid) if command_name(p).startswith("chrom")]


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages are split between the processes that map them (RSS double-counts)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of /proc/PID/stat (1-based), 11 and 12 after the command name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def tree_usage(root_pid: int, include_root: bool = True) -> tuple[float, int, int]:
    """(CPU seconds, PSS kB, process count) summed over a process and its descendants."""
    pids = ([root_pid] if include_root else []) + descendants(root_pid)
    return sum(cpu_seconds(p) for p in pids), sum(pss_kb(p) for p in pids), len(pids)


def parent_pid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def browser_main_pids(root_pid: int) -> list[int]:
    """The Chromium browser processes (not their renderers and helpers) below ``root_pid``."""
    chromes = set(chromium_pids(root_pid))
    return [p for p in chromes if parent_pid(p) not in chromes]


def renderer_pids(root_pid: int) -> list[int]:
    """Chromium renderer processes (the pages) below ``root_pid``."""
    found = []
    for pid in chromium_pids(root_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        # Zygote children rewrite their command line into one space-separated string.
        if b"--type=renderer" in cmdline:
            found.append(pid)
    return found


def chromium_role(pid: int) -> str:
    """What a Chromium process does: "browser" (the main process), or its --type (renderer, gpu-process, zygote,
    utility:NetworkService, ...), read from its command line."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
    except OSError:
        return "gone"
    kind = next((a.split("=", 1)[1] for a in args if a.startswith("--type=")), "browser")
    if kind == "utility":
        sub = next((a.split("=", 1)[1] for a in args if a.startswith("--utility-sub-type=")), "")
        kind = f"utility:{sub.rsplit('.', 1)[-1]}" if sub else kind
    return kind


def chromium_roles(root_pid: int) -> dict[str, tuple[float, int, int]]:
    """(CPU seconds, PSS kB, process count) of the Chromium processes below ``root_pid``, by role: what a call's
    own browser costs apart from its page (the renderer), i.e. what calls sharing one browser would share."""
    roles: dict[str, tuple[float, int, int]] = {}
    for pid in chromium_pids(root_pid):
        role = chromium_role(pid)
        cpu, pss, count = roles.get(role, (0.0, 0, 0))
        roles[role] = (cpu + cpu_seconds(pid), pss + pss_kb(pid), count + 1)
    return roles

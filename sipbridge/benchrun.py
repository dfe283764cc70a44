"""Repeated benchmark runs with their provenance, so a figure can be reproduced and judged.

A benchmark script in bench/ writes one JSON result. `sipbridge bench NAME --runs N` runs it N times and, for
each run, records what the figure depends on: the commit, the machine, the load average before and after, and
every program's CPU time and peak PSS while it ran (Janus, Chromium, sipp and the bridge's stages apart, so a
reader sees what the simulation cost next to the bridge). The runs are summarised as min-max of every numeric
figure: the only form in which a figure goes into the README.

Pure parts (`summarise`, `label_of`) do no I/O and are unit-tested; `ProcessAccountant` reads /proc.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.browser.procs import pss_kb

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# Sampling period of the process accountant: short enough to see a stage that lives a second, long enough
# that reading /proc costs well under 1 % of a core.
SAMPLE_INTERVAL_S = 0.5
# Below this a program is left out of the figures: one clock tick of CPU is noise.
MIN_CPU_S = 0.02


def label_of(comm: str, argv: list[str]) -> str:
    """A stable name for a process, grouping instances of one program: `stage:encoder`, `chromium`, `janus`."""
    if comm.startswith("chrom"):
        return "chromium"
    if "-m" in argv and argv.index("-m") + 1 < len(argv) and argv[argv.index("-m") + 1].startswith("sipbridge."):
        return argv[argv.index("-m") + 1].removeprefix("sipbridge.")  # sipbridge.supervisord: `supervisord`
    if "-m" in argv and "sipbridge" in argv:
        rest = argv[argv.index("sipbridge") + 1 :] if argv[argv.index("-m") + 1] == "sipbridge" else []
        if rest[:1] == ["stage"] and len(rest) > 1:
            # The stage's kind names it; `--name` would make every test's instance a label of its own.
            return f"stage:{rest[1]}"
        if rest:
            return f"sipbridge {rest[0]}" + (f" {rest[1]}" if len(rest) > 1 and not rest[1].startswith("-") else "")
    if comm.startswith("python") and len(argv) > 1:
        return f"python {Path(argv[1]).name}"
    return comm


@dataclass
class _Seen:
    label: str
    first_cpu_s: float
    last_cpu_s: float
    max_pss_kb: int = 0


@dataclass
class ProcessAccountant:
    """CPU seconds and peak PSS of every process on the machine during a window, grouped by program.

    Processes born during the window count all their CPU; those alive at the start count only what they used
    after it. A process that dies between two samples loses at most one sample period of CPU.
    """

    exclude_pids: set[int] = field(default_factory=lambda: {os.getpid()})
    _seen: dict[tuple[int, int], _Seen] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._sample(initial=True)
        self._thread = threading.Thread(target=self._run, name="bench-accountant", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample(initial=False)
        return self.figures()

    def figures(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for seen in self._seen.values():
            entry = out.setdefault(seen.label, {"cpu_s": 0.0, "pss_mb_max": 0.0, "processes": 0})
            entry["cpu_s"] += seen.last_cpu_s - seen.first_cpu_s
            entry["pss_mb_max"] = max(entry["pss_mb_max"], seen.max_pss_kb / 1024)
            entry["processes"] += 1
        for entry in out.values():
            entry["cpu_s"] = round(entry["cpu_s"], 2)
            entry["pss_mb_max"] = round(entry["pss_mb_max"], 1)
        # Programs that used no measurable CPU (shells, idle daemons) would only bury the ones that did.
        busy = {label: entry for label, entry in out.items() if entry["cpu_s"] >= MIN_CPU_S}
        return dict(sorted(busy.items(), key=lambda kv: -kv[1]["cpu_s"]))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample(initial=False)

    def _sample(self, *, initial: bool) -> None:
        for pid, start_ticks, comm, cpu_s, argv in _processes():
            if pid in self.exclude_pids:
                continue
            key = (pid, start_ticks)  # a pid can be reused; its start time tells two processes apart
            seen = self._seen.get(key)
            if seen is None:
                seen = _Seen(label_of(comm, argv), cpu_s if initial else 0.0, cpu_s)
                self._seen[key] = seen
            seen.last_cpu_s = cpu_s
            seen.max_pss_kb = max(seen.max_pss_kb, pss_kb(pid))


def _processes() -> Iterator[tuple[int, int, str, float, list[str]]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) < 20 or not argv[0]:
            continue  # kernel threads have no command line
        cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S
        yield int(entry.name), int(fields[19]), comm, cpu_s, [a.decode(errors="replace") for a in argv if a]


def provenance(project_dir: Path) -> dict[str, Any]:
    """What a figure was measured on: commit (and whether the tree was clean), machine, software."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "commit": git("rev-parse", "HEAD") or None,
        "tree_clean": git("status", "--porcelain", "--untracked-files=no") == "",
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _numeric_leaves(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if math.isfinite(value):
            yield path, float(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _numeric_leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list) and len(value) <= 16:
        # Short lists are figures (p50/p95 pairs, per-call rows); long ones are samples, summarised elsewhere.
        for i, item in enumerate(value):
            yield from _numeric_leaves(item, f"{path}[{i}]")


def summarise(runs: list[Any]) -> dict[str, dict[str, float]]:
    """min, max and median of every numeric figure present in all runs (a figure missing from a run is left out:
    a min-max over fewer runs than claimed would mislead)."""
    columns: dict[str, list[float]] = {}
    for run in runs:
        for path, number in _numeric_leaves(run):
            columns.setdefault(path, []).append(number)
    out: dict[str, dict[str, float]] = {}
    for path, values in columns.items():
        if len(values) != len(runs):
            continue
        ordered = sorted(values)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        out[path] = {"min": ordered[0], "max": ordered[-1], "median": median}
    return out

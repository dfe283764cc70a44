"""Pure analysis for the fault and soak benchmarks (bench/bench_faults.py, bench/bench_soak.py): no I/O, unit-tested.

* media gaps around a fault: the largest silence in a list of arrival times (RTP packets at the SIP peer, the room
  viewer's reports) in a window around the fault, and what a sequence of frame counters skipped;
* least-squares slopes (PSS in MB per minute, latency in ms per minute) and drift between the start and the end;
* drop counters that grow steadily rather than in an occasional burst;
* each figure against its target: met / not met.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Recovery targets of issue 15 (seconds of media missing at the SIP peer or in the room).
TARGET_GAP_S = {"python_stage": 2.0, "browser": 3.0, "janus": 10.0}
# Soak targets of issue 15: no process grows faster than this (MB per minute, least squares over the soak).
TARGET_PSS_SLOPE_MB_PER_MIN = 0.05
# The floor of a sawtooth (floor_slope): the lowest sample in each window this long. Longer than the longest
# tooth: Chromium's renderer took up to 10 minutes to come back down to its floor in an hour's soak, and 5-minute
# windows then caught the middle of a descent (214 MB against a 200-202 MB floor) as if it were the floor.
FLOOR_WINDOW_MIN = 10.0
# "No drift": the median of the last quarter of the soak within this of the first quarter's median. A bridged
# hop's latency p50 moves by a few ms with the machine's load; more than this is a trend, not load.
TARGET_LATENCY_DRIFT_MS = 10.0
# Lip sync: half a video frame at 30 fps; a receiver's jitter buffer moves by about this much on its own.
TARGET_LIPSYNC_DRIFT_MS = 20.0
# A drop counter "grows steadily" when it went up in more than this share of the sampled minutes: a burst in
# one or two minutes of a loaded machine is not a leak of frames, a counter rising minute after minute is.
STEADY_GROWTH_SHARE = 0.25


Packet = tuple[float, int, int]  # an RTP packet in a capture: arrival (epoch s), SSRC, sequence number


@dataclass(frozen=True)
class Gap:
    """The longest time without media in a window: from the last arrival before it to the first after it."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def largest_gap(times: Sequence[float], window_start: float, window_end: float) -> Gap | None:
    """The largest interval between consecutive arrivals that overlaps [window_start, window_end].

    ``times`` in seconds, any order. The gap runs from the last arrival at or before the window's start (or inside
    it) to the next one; when media never came back, it runs to the window's end (an open gap: still missing).
    None when nothing arrived before the window (no media to lose).
    """
    ordered = sorted(times)
    before = [t for t in ordered if t <= window_start]
    if not before:
        return None
    points = [before[-1], *(t for t in ordered if window_start < t <= window_end)]
    after = [t for t in ordered if t > window_end]
    # Without an arrival after the window, the tail since the last one counts as missing media (an open gap).
    points.append(after[0] if after else window_end)
    best = Gap(points[0], points[1])
    for a, b in itertools.pairwise(points):
        if b - a > best.seconds:
            best = Gap(a, b)
    return best


def recovered_after(times: Sequence[float], fault_at: float, steady_period_s: float,
                    run_length: int = 3) -> float | None:
    """When media was back for good after a fault: the first arrival after ``fault_at`` that starts ``run_length``
    arrivals spaced no more than ``steady_period_s`` apart (a lone packet sent while a stage restarts is not
    media back). None if it never came back."""
    after = sorted(t for t in times if t > fault_at)
    for i in range(len(after) - run_length + 1):
        run = after[i : i + run_length]
        if all(b - a <= steady_period_s for a, b in itertools.pairwise(run)):
            return run[0]
    return None


def counters_lost(counters: Sequence[int], around: tuple[int, int] | None = None) -> int:
    """Frames missing from a sequence of frame counters read in order (each frame carries the next counter): the sum
    of the jumps forward beyond one. A counter going back (a loop wrapped, a source restarted) starts a new run.
    ``around`` (index range) limits the count to jumps inside it."""
    lost = 0
    lo, hi = around if around is not None else (0, len(counters))
    for i in range(max(1, lo), min(hi, len(counters))):
        step = counters[i] - counters[i - 1]
        if step > 1:
            lost += step - 1
    return lost


def slope(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """Least-squares slope of ys against xs (None with fewer than two distinct xs)."""
    pairs = [(x, float(y)) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    if len(pairs) < 2:
        return None
    n = len(pairs)
    mx = sum(x for x, _ in pairs) / n
    my = sum(y for _, y in pairs) / n
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in pairs) / sxx


def floor_slope(xs: Sequence[float], ys: Sequence[float | None], window: float = FLOOR_WINDOW_MIN) -> float | None:
    """Least-squares slope of the lowest y in each consecutive ``window`` of xs (at the window's middle).

    A garbage-collected heap (Chromium's renderer, node) moves in a sawtooth of tens of MB: a least-squares slope
    through every sample then follows where the teeth happen to fall (one hour's renderer, 200-254 MB with its
    floor at 200-202 MB throughout, read +0.09 MB/min; the same process read -0.25 in another soak), while what a
    leak raises is the floor the collector comes back to. None with fewer than two windows."""
    pairs = [(x, float(y)) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    if not pairs or window <= 0:
        return None
    start = min(x for x, _ in pairs)
    lows: dict[int, float] = {}
    for x, y in pairs:
        index = int((x - start) // window)
        lows[index] = min(y, lows.get(index, y))
    # A last window shorter than half a window holds too few samples to find the floor.
    last = max(lows)
    if max(x for x, _ in pairs) - (start + last * window) < window / 2 and len(lows) > 2:
        del lows[last]
    indices = sorted(lows)
    return slope([start + (i + 0.5) * window for i in indices], [lows[i] for i in indices])


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def drift(values: Sequence[float | None]) -> float | None:
    """Median of the last quarter minus median of the first quarter (at least one value each)."""
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    if len(present) < 2:
        return None
    quarter = max(1, len(present) // 4)
    return _median(present[-quarter:]) - _median(present[:quarter])


def counter_growth(samples: Sequence[int]) -> dict[str, Any]:
    """How a cumulative counter sampled once a minute grew: total, minutes in which it rose, whether steadily.

    A counter that went back (the stage restarted and counts from 0) contributes what it counted after the restart.
    """
    increments = []
    for a, b in itertools.pairwise(samples):
        increments.append(b - a if b >= a else b)
    rising = sum(1 for d in increments if d > 0)
    steady = bool(increments) and rising / len(increments) > STEADY_GROWTH_SHARE
    return {"total": sum(increments), "minutes_rising": rising, "minutes": len(increments), "steady": steady}


def met(value: float | None, target: float, *, absolute: bool = False) -> str:
    """'met' when value <= target (|value| with absolute), 'not met' otherwise, 'no data' without a value."""
    if value is None or not math.isfinite(value):
        return "no data"
    return "met" if (abs(value) if absolute else value) <= target else "not met"


def gap_target_s(kind: str) -> float:
    """The recovery target for a fault of ``kind`` (python_stage, browser, janus)."""
    return TARGET_GAP_S[kind]


def moving_picture_times(reports: Sequence[Mapping[str, Any]]) -> list[float]:
    """Times of the viewer's reports in which the bot's picture moved: a frame counter other than the last one read
    (the bot's camera shows the SIP side's echo of the participant; a frozen or slate picture repeats or has none)."""
    times, last = [], None
    for r in reports:
        counters = r.get("counters") or []
        if any(c != last for c in counters):
            times.append(r["t"])
        if counters:
            last = counters[-1]
    return times


def capture_missed(packets: Sequence[Packet], start: float, end: float) -> int:
    """Packets the capture never saw between two arrivals of one RTP stream (sequence numbers skipped): on loopback
    nothing is lost on the way, so a skipped number is the capture falling behind (a loaded machine), and a gap
    across it is not a gap in the media."""
    by_time = {t: (ssrc, seq) for t, ssrc, seq in packets}
    a, b = by_time.get(start), by_time.get(end)
    if a is None or b is None or a[0] != b[0]:
        return 0  # the gap's end is the window's end, or the sender restarted (a new SSRC): a real gap
    return (b[1] - a[1] - 1) % 65536

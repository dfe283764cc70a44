"""The fault and soak benchmarks' analysis (sipbridge.testing.endurance) on fixed input: gaps in packet times,
recovery, frames lost, slopes, drift, drop growth, met / not met."""

from __future__ import annotations

import pytest

from sipbridge.testing import endurance


def packets(start: float, end: float, period: float) -> list[float]:
    n = round((end - start) / period)
    return [start + i * period for i in range(n + 1)]


def test_largest_gap_spans_the_fault_from_the_last_packet_before_to_the_first_after() -> None:
    # 50 packets/s, a hole from 10.02 to 11.52 (the stage died at 10.05), then steady again.
    times = packets(0.0, 10.02, 0.02) + packets(11.52, 20.0, 0.02)
    gap = endurance.largest_gap(times, window_start=10.05, window_end=18.0)
    assert gap is not None
    assert gap.start == pytest.approx(10.02) and gap.end == pytest.approx(11.52)
    assert gap.seconds == pytest.approx(1.5)


def test_largest_gap_finds_a_later_hole_in_the_window_and_ignores_holes_outside_it() -> None:
    # A 3 s hole before the window (not this fault's), a short hole at the fault, a longer one later in the window.
    times = packets(0.0, 2.0, 0.1) + packets(5.0, 10.0, 0.1) + packets(10.4, 12.0, 0.1) + packets(14.5, 20.0, 0.1)
    gap = endurance.largest_gap(times, window_start=10.05, window_end=19.0)
    assert gap is not None and gap.seconds == pytest.approx(2.5)
    assert gap.start == pytest.approx(12.0)


def test_largest_gap_without_media_back_runs_to_the_end_of_the_window() -> None:
    times = packets(0.0, 10.0, 0.1)
    gap = endurance.largest_gap(times, window_start=10.05, window_end=70.0)
    assert gap is not None and gap.start == pytest.approx(10.0) and gap.end == 70.0


def test_largest_gap_with_no_media_before_the_fault_is_none() -> None:
    assert endurance.largest_gap([11.0, 12.0], window_start=10.0, window_end=20.0) is None
    assert endurance.largest_gap([], window_start=10.0, window_end=20.0) is None


def test_largest_gap_accepts_unordered_times() -> None:
    times = [3.0, 1.0, 2.0, 6.0, 7.0]
    gap = endurance.largest_gap(times, window_start=3.5, window_end=10.0)
    assert gap is not None and (gap.start, gap.end) == (3.0, 6.0)


def test_recovered_after_needs_a_steady_run_not_a_stray_packet() -> None:
    # One stray packet at 11.0 while the stage restarts, steady media from 13.0 on.
    times = [*packets(0.0, 10.0, 0.5), 11.0, *packets(13.0, 16.0, 0.5)]
    assert endurance.recovered_after(times, fault_at=10.2, steady_period_s=1.25, run_length=3) == pytest.approx(13.0)
    assert endurance.recovered_after(packets(0.0, 10.0, 0.5), fault_at=10.2, steady_period_s=1.25) is None


def test_counters_lost_counts_skipped_frames_and_survives_a_restarted_source() -> None:
    assert endurance.counters_lost([1, 2, 3, 4]) == 0
    assert endurance.counters_lost([1, 2, 3, 10, 11]) == 6  # 4..9 never seen
    assert endurance.counters_lost([100, 101, 5, 6, 9]) == 2  # went back (new source): 7, 8 lost after it
    assert endurance.counters_lost([1, 5, 6, 20], around=(2, 4)) == 13  # only the jump 6 -> 20 is inside


def test_slope_is_least_squares() -> None:
    minutes = list(range(1, 61))
    growing = [40.0 + 0.4 * m for m in minutes]
    assert endurance.slope(minutes, growing) == pytest.approx(0.4)
    # Noise around a flat line: alternating +-1 MB gives a slope near zero, not the jumps between samples.
    flat = [50.0 + (1.0 if m % 2 else -1.0) for m in minutes]
    value = endurance.slope(minutes, flat)
    assert value is not None and abs(value) < 0.002
    assert endurance.slope([1.0], [2.0]) is None
    assert endurance.slope([1.0, 1.0], [2.0, 3.0]) is None


def test_slope_skips_missing_samples() -> None:
    assert endurance.slope([1, 2, 3, 4], [1.0, None, 3.0, 4.0]) == pytest.approx(1.0)


def test_drift_compares_the_last_quarter_with_the_first() -> None:
    assert endurance.drift([10.0] * 8 + [30.0] * 4) == pytest.approx(20.0)
    assert endurance.drift([5.0, 6.0, 5.0, 6.0, 5.0, 6.0, 5.0, 6.0]) == pytest.approx(0.0)  # noise, no trend
    assert endurance.drift([None, None]) is None
    assert endurance.drift([None, 3.0, None, 5.0]) == pytest.approx(2.0)


def test_counter_growth_tells_a_steady_leak_from_a_burst() -> None:
    steady = endurance.counter_growth([0, 30, 61, 90, 122, 150, 181, 210, 240])
    assert steady["steady"] and steady["total"] == 240 and steady["minutes_rising"] == 8
    burst = endurance.counter_growth([0, 0, 0, 500, 500, 500, 500, 500, 500])
    assert not burst["steady"] and burst["total"] == 500 and burst["minutes_rising"] == 1
    # A restarted stage counts from 0 again: what it counted after the restart is growth, not a fall.
    restarted = endurance.counter_growth([10, 20, 3, 3])
    assert restarted["total"] == 13


def test_met_against_targets() -> None:
    assert endurance.met(1.4, endurance.gap_target_s("python_stage")) == "met"
    assert endurance.met(2.6, endurance.gap_target_s("python_stage")) == "not met"
    assert endurance.met(2.6, endurance.gap_target_s("browser")) == "met"
    assert endurance.met(12.0, endurance.gap_target_s("janus")) == "not met"
    assert endurance.met(0.06, endurance.TARGET_PSS_SLOPE_MB_PER_MIN) == "not met"
    assert endurance.met(-0.3, endurance.TARGET_PSS_SLOPE_MB_PER_MIN) == "met"  # shrinking is fine
    assert endurance.met(-25.0, endurance.TARGET_LIPSYNC_DRIFT_MS, absolute=True) == "not met"
    assert endurance.met(None, 1.0) == "no data"
    assert endurance.met(float("nan"), 1.0) == "no data"


def test_moving_picture_times_skip_frozen_and_unreadable_pictures() -> None:
    reports = [
        {"t": 1.0, "counters": [1, 2, 3]},
        {"t": 1.5, "counters": [3, 3, 3]},  # frozen on the last picture: not media
        {"t": 2.0, "counters": []},  # a slate or unreadable pictures
        {"t": 2.5, "counters": [3]},
        {"t": 3.0, "counters": [40, 41]},  # moving again
        {"t": 3.5, "counters": [42]},
    ]
    assert endurance.moving_picture_times(reports) == [1.0, 3.0, 3.5]


def test_capture_missed_tells_the_captures_holes_from_the_medias() -> None:
    ssrc = 0x1234
    # 50 packets/s; the capture lost seq 103..152 (1 s) while the sender went on: a hole of the capture's.
    packets = [(10.0 + i * 0.02, ssrc, 100 + i) for i in range(3)] + [(11.06, ssrc, 153)]
    assert endurance.capture_missed(packets, 10.04, 11.06) == 50
    # The sender stopped: consecutive numbers across the hole, a real gap.
    real = [(10.0, ssrc, 100), (10.02, ssrc, 101), (12.0, ssrc, 102)]
    assert endurance.capture_missed(real, 10.02, 12.0) == 0
    # Sequence numbers wrap at 2**16.
    wrapped = [(10.0, ssrc, 65534), (10.1, ssrc, 2)]
    assert endurance.capture_missed(wrapped, 10.0, 10.1) == 3
    # A new SSRC after the hole (the sender restarted, e.g. a re-dialled call): a real gap.
    restarted = [(10.0, ssrc, 100), (12.0, 0x9999, 7)]
    assert endurance.capture_missed(restarted, 10.0, 12.0) == 0
    # An open gap (no packet after it, the window's end) is real.
    assert endurance.capture_missed(real, 12.0, 70.0) == 0


def sawtooth(minutes: int, floor: float, leak_per_min: float, tooth_min: int = 7, height: float = 50.0) -> list[float]:
    """A collected heap: up by `height` at each collection-free stretch's start, down by the minute to its floor."""
    return [floor + leak_per_min * m + height * (1 - (m % tooth_min) / tooth_min) for m in range(minutes)]


def test_the_floor_slope_sees_no_growth_in_a_sawtooth_that_a_least_squares_slope_reads_as_growth() -> None:
    minutes = list(range(11, 61))
    values = sawtooth(61, 200.0, 0.0)[11:]
    values[-3] += 40.0  # a tooth near the end, as the renderer's at minute 59
    assert endurance.slope(minutes, values) > endurance.TARGET_PSS_SLOPE_MB_PER_MIN
    floor = endurance.floor_slope(minutes, values)
    assert floor is not None and abs(floor) < 0.01


def test_the_floor_slope_finds_a_leak_under_the_sawtooth() -> None:
    minutes = list(range(11, 61))
    values = sawtooth(61, 200.0, 0.2)[11:]
    floor = endurance.floor_slope(minutes, values)
    assert floor is not None and floor == pytest.approx(0.2, abs=0.03)


def test_the_floor_slope_needs_two_windows() -> None:
    assert endurance.floor_slope([1, 2, 3], [5.0, 6.0, 7.0]) is None
    assert endurance.floor_slope([], []) is None
    assert endurance.floor_slope([1.0, 30.0], [5.0, None]) is None

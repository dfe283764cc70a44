"""Lip-sync marks found on both sides of a real bridged call (Chromium, Janus, sipp, in a private namespace).

One participant publishes the marks of synthetic.js (every 2 s a bright bottom band and a 2.5 kHz burst at the same
instant); a receive-only viewer's probe finds them in what it receives from the participant directly and from the
bot (the sipp peer's echo, SIP -> room); the SIP peer's side is read from the tshark capture (H.264 pictures decoded
per RTP timestamp, PCMU decoded per packet). What is asserted is that the marks are there, each with both an audio
and a video onset; the offsets themselves are timing and belong to bench/bench_bridge.py.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest

from sipbridge.testing.lipsync import (
    MARK_HZ,
    SYNC_PERIOD_MS,
    audio_mark_onsets,
    lipsync_report,
    mark_band_bright,
    pair_marks,
    sync_in_room,
)
from sipbridge.testing.localcall import BOT_NAME, CallOptions, LocalCall
from tests.test_bridge_e2e import need_media_tools

MIN_MARKS = 3
MARKS_TIMEOUT_S = 40.0
# How far from the mark grid an onset may land: the jitter of a loaded 2-core machine, well below half a period.
ONSET_JITTER_MS = 600.0
BURST_S = 0.1


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_burst_onsets_found_to_a_sample_over_tones(rate: int) -> None:
    """The detector the SIP side uses (probe.js runs the same one): bursts over two tones, each onset to about one
    sample, chunk arrival times carried through."""
    n = np.arange(rate * 7)
    x = 0.2 * np.sin(2 * np.pi * 440 * n / rate) + 0.2 * np.sin(2 * np.pi * 660 * n / rate + 1)
    starts = [int(1.0 * rate) + 3, int(3.0 * rate) + 7, int(5.0 * rate) + 11]
    burst = 0.2 * np.sin(2 * np.pi * MARK_HZ * np.arange(int(BURST_S * rate)) / rate)
    for s0 in starts:
        x[s0 : s0 + burst.size] += burst
    chunk = rate // 50
    chunk_starts = np.arange(0, x.size, chunk)
    chunk_times = 1_000_000.0 + chunk_starts * 1000 / rate
    onsets = audio_mark_onsets(x, rate, chunk_starts, chunk_times)
    expected = [1_000_000.0 + s0 * 1000 / rate for s0 in starts]
    assert len(onsets) == len(expected), onsets
    assert all(abs(o - e) <= 1.5 * 1000 / rate for o, e in zip(onsets, expected, strict=True)), (onsets, expected)


def test_tones_alone_are_no_marks() -> None:
    rate = 8000
    n = np.arange(rate * 3)
    x = 0.4 * np.sin(2 * np.pi * 440 * n / rate) + 0.4 * np.sin(2 * np.pi * 1000 * n / rate)
    assert audio_mark_onsets(x, rate, np.array([0]), np.array([0.0])) == []


def test_mark_band_and_pairing() -> None:
    y = np.full((240, 320), 120, np.uint8)
    y[-30:] = 16
    assert not mark_band_bright(y)
    y[-30:] = 235
    assert mark_band_bright(y)
    # Each video onset takes the nearest audio onset less than half a period away; a lone onset pairs with nothing.
    pairs = pair_marks([2040.0, 4010.0, 6020.0], [2080.0, 3990.0, 9000.0])
    assert [round(p["offset_ms"]) for p in pairs] == [40, -20]


@pytest.mark.media
@pytest.mark.timeout(120)
def test_sync_marks_found_at_the_sip_peer_and_in_the_room(tmp_path: Path) -> None:
    need_media_tools()
    options = CallOptions(
        participants=[("alice", 440.0)],
        room_codec="h264",
        participant_size="320x240",
        participant_fps=15,
        layout="single",
        max_tiles=1,
        split=None,
        layout_ids=["alice/video"],
        viewer=True,
        sync_marks=True,
    )
    call_start_ms = time.time() * 1000.0
    with LocalCall(tmp_path / "run", options) as call:
        assert call.participants is not None
        observer = call.sync_observer
        deadline = time.monotonic() + MARKS_TIMEOUT_S
        while time.monotonic() < deadline:
            counts = [sync_in_room(call.participants, observer, s)["marks"] for s in ("alice", BOT_NAME)]
            if min(counts) >= MIN_MARKS:
                break
            time.sleep(0.5)
        call.stop_bridge()  # hang up: the capture then holds the whole call
        time.sleep(0.3)
        report = lipsync_report(call)
    call_end_ms = time.time() * 1000.0
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "pairs"} if isinstance(v, dict) else v
               for k, v in report.items()}  # fmt: skip
    print(json.dumps(summary, indent=1))
    # The participant page sent its marks, both halves of each.
    assert report["source"]["marks"] >= MIN_MARKS, summary
    # Each side found at least MIN_MARKS marks with an audio onset and a video onset (pair_marks keeps only marks
    # that have both, less than half a period apart).
    for where in ("sip", "room_direct", "room_via_bridge"):
        assert report[where]["marks"] >= MIN_MARKS, (where, summary)
        pairs = report[where]["pairs"]
        # Onsets are wall-clock times seen during this call, not leftovers or garbage from the parser...
        for pair in pairs:
            for key in ("video_ms", "audio_ms"):
                assert call_start_ms < pair[key] < call_end_ms, (where, key, pair)
        # ...and the marks found are the participant's, sent every SYNC_PERIOD_MS: consecutive video onsets lie
        # a whole number of periods apart (up to the latency jitter of a loaded machine).
        onsets = sorted(p["video_ms"] for p in pairs)
        for a, b in itertools.pairwise(onsets):
            periods = (b - a) / SYNC_PERIOD_MS
            assert round(periods) >= 1 and abs(periods - round(periods)) < ONSET_JITTER_MS / SYNC_PERIOD_MS, (
                where, onsets)

"""Lip-sync marks found on both sides of a real bridged call (Chromium, Janus, sipp, in a private namespace).

One participant publishes the marks of synthetic.js (every 2 s a bright bottom band and a 2.5 kHz burst at the same
instant); a receive-only viewer's probe finds them in what it receives from the participant directly and from the
bot (the sipp peer's echo, SIP -> room); the SIP peer's side is read from the tshark capture (H.264 pictures decoded
per RTP timestamp, PCMU decoded per packet). What is asserted is that the marks are there, each with both an audio
and a video onset; the offsets themselves are timing and belong to bench/bench_bridge.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sipbridge.demo import BOT_NAME, CallOptions, LocalCall, lipsync_report, sync_in_room
from tests.test_bridge_e2e import need_media_tools

MIN_MARKS = 3
MARKS_TIMEOUT_S = 40.0


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
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "pairs"} if isinstance(v, dict) else v
               for k, v in report.items()}  # fmt: skip
    print(json.dumps(summary, indent=1))
    # The participant page sent its marks, both halves of each.
    assert report["source"]["marks"] >= MIN_MARKS, summary
    # Each side found at least MIN_MARKS marks with an audio onset and a video onset (pair_marks keeps only marks
    # that have both, less than half a period apart).
    for where in ("sip", "room_direct", "room_via_bridge"):
        assert report[where]["marks"] >= MIN_MARKS, (where, summary)
        for pair in report[where]["pairs"]:
            assert pair["video_ms"] > 0 and pair["audio_ms"] > 0, (where, pair)

"""Issue 9, item 4, end to end: nobody vanishes from the grid the SIP side sees while their media flows.

Three room participants (browserless publishers) are composed into a 2x2 grid for SIP. The room decoder (the
process between the bot's browser and the composer) is stopped with SIGSTOP for 300 ms five times during the call,
as a loaded machine might stall it. After each stall, every participant's counter must move on in the composite
*as the SIP peer received it* (pictures decoded from the peer's capture, timed by their arrival) within 2 s of the
decoder resuming.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from sipbridge.status import StatusCollector
from sipbridge.supervise import _program_pid
from sipbridge.testing.capture import h264_timed_frames_from_capture, tile_counters
from sipbridge.testing.localcall import CallOptions, LocalCall, wait_until
from tests.test_bridge_e2e import MEDIA_TIMEOUT_S, PERSON_FPS, VIDEO_PORT, need_media_tools

STALLS = 5
STALL_S = 0.3
RECOVERY_S = 2.0  # the bound: each person's counter moves on at the SIP peer within 2 s of the resume
BETWEEN_STALLS_S = 3.0
TAIL_S = 3.0  # media after the last stall, so its recovery window is inside the capture
SETTLE_S = 3.0  # after the loop closes: the staggered joiners' tiles are in the composite too
MIN_JUDGED_STALLS = 3
STATS_POLL_S = 1.0


def wait_for_grid_sent_to_sip(call: LocalCall, people: list[str]) -> None:
    """Until the composer's grid holds every person and the janus stage has sent audio and video to the peer (the
    stages' own figures: the browserless viewer cannot read a counter off a grid of pictures)."""
    collector = StatusCollector(call.run_dir)
    seen: dict[str, Any] = {}

    def ready() -> bool:
        collector.poll(STATS_POLL_S)
        tiles = collector.figures.get("room-transformer", {}).get("grid_tiles") or []
        janus = collector.figures.get("janus", {})
        seen.update(tiles=tiles, video=janus.get("video_packets_sent", 0), audio=janus.get("audio_packets_sent", 0))
        return set(people) <= set(tiles) and seen["video"] > 0 and seen["audio"] > 0

    try:
        wait_until(ready, MEDIA_TIMEOUT_S, "every person in the grid sent to the SIP peer")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {seen}\n{call.stage_log('room-transformer', 10)}") from exc
    finally:
        collector.close()


@pytest.mark.media
@pytest.mark.timeout(200)
def test_every_participant_moves_on_at_the_sip_peer_after_room_decoder_stalls(tmp_path: Path) -> None:
    need_media_tools()
    people = ["alice", "bob", "carol"]
    options = CallOptions(
        participants=[("alice", 440.0), ("bob", 550.0), ("carol", 660.0)],
        room_codec="h264",
        max_tiles=4,
        layout_ids=[f"{p}/video" for p in people],  # tile 0 alice, 1 bob, 2 carol
        split=None,
        stagger_s=0.5,
        fps_of=PERSON_FPS,
        # Browserless publishers (a loop encoded once): three Chromium participants would load the two cores so that
        # the bridge has no headroom left to catch up after a stall, and the test would measure its simulation.
        generators="aiortc",
    )
    stalls: list[tuple[float, float]] = []  # (stopped, resumed), epoch seconds like the capture's timestamps
    with LocalCall(tmp_path / "run", options) as call:
        # Everyone is in the grid and the janus stage sends its pictures and sound to the SIP peer.
        wait_for_grid_sent_to_sip(call, people)
        time.sleep(SETTLE_S)
        pid = _program_pid(call.run_dir, "room-decoder")
        assert pid is not None, "no room decoder under supervisord"
        try:
            for _ in range(STALLS):
                stopped = time.time()
                os.kill(pid, signal.SIGSTOP)
                time.sleep(STALL_S)
                os.kill(pid, signal.SIGCONT)
                stalls.append((stopped, time.time()))
                time.sleep(BETWEEN_STALLS_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        time.sleep(TAIL_S)
        # The same process throughout: a stall is not a crash, nothing was restarted.
        assert _program_pid(call.run_dir, "room-decoder") == pid
        call.stop_bridge()
    timed = [
        (arrived, tile_counters(frame, 2, 2))
        for arrived, frame in h264_timed_frames_from_capture(call.pcap, VIDEO_PORT)
    ]
    assert timed, "the SIP peer received no H.264 picture"
    # A stall is judged where the capture can show it: everyone's tile read in the 2 s before it, and whole pictures
    # in the recovery window. After packets the capture missed (a busy machine), the reader skips to the next IDR
    # (h264_units_from_capture), so a window can hold no picture though the peer got them: that stall is not
    # judged. A window with pictures in which someone's counter stands still fails.
    judged = 0
    for number, (stopped, resumed) in enumerate(stalls, 1):
        window = [(at, t) for at, t in timed if resumed < at <= resumed + RECOVERY_S]
        recent = [t for at, t in timed if stopped - RECOVERY_S <= at < stopped]
        if not window or not all(any(t[tile] for t in recent) for tile in range(len(people))):
            continue
        judged += 1
        for tile, person in enumerate(people):
            before = [t[tile] for at, t in timed if at < stopped and t[tile]]
            after = [(round(at - resumed, 2), t[tile]) for at, t in window if t[tile]]
            assert any(counter > before[-1] for _, counter in after), (
                f"stall {number}: {person}'s counter did not move on at the SIP peer within {RECOVERY_S} s of "
                f"the resume (last before: {before[-1]}; after, as (s since resume, counter): {after[:20]})\n"
                f"{call.stage_log('room-transformer', 10)}"
            )
    assert judged >= MIN_JUDGED_STALLS, f"only {judged} of {STALLS} stalls could be judged from the capture"

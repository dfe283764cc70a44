"""Participants leaving and joining are seen as track events, and the newcomer's media flows."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol import EventType
from tests.roomfix import Collector, Room, in_order, room_fixture, stop_process, wait_until  # noqa: F401
from tests.sipfix import janus_fixture, netns_fixture  # noqa: F401  (pytest fixtures)

pytestmark = [pytest.mark.media, pytest.mark.timeout(120)]

ROOM_ID = 4301
MIN_FRAMES = 20
MEDIA_TIMEOUT_S = 40.0


def test_leave_and_join_are_track_events(room: Room, tmp_path: Path) -> None:
    alice, _ = room.participants(ROOM_ID, [("alice", 440.0)])
    out = f"ipc://{tmp_path}/bot.sock"
    collector = Collector(out)
    try:
        room.bot(ROOM_ID, out)
        wait_until(lambda: len(collector.counters("alice/video")) >= MIN_FRAMES, MEDIA_TIMEOUT_S, "alice's video")

        room.participants(ROOM_ID, [("carol", 880.0)])
        wait_until(lambda: len(collector.counters("carol/video")) >= MIN_FRAMES, MEDIA_TIMEOUT_S, "carol's video")
        added = {e.stream_id for e in collector.events_of(EventType.TRACK_ADDED)}
        assert {"alice/video", "alice/audio", "carol/video", "carol/audio"} <= added
        assert in_order(collector.counters("carol/video"))
        wait_until(lambda: collector.tone("carol/audio") is not None, MEDIA_TIMEOUT_S, "carol's audio")
        assert abs((collector.tone("carol/audio") or 0) - 880.0) < 10

        stop_process(alice)  # SIGTERM: the page leaves the room
        wait_until(lambda: {"alice/video", "alice/audio"} <= {e.stream_id for e in
                                                              collector.events_of(EventType.TRACK_ENDED)},
                   MEDIA_TIMEOUT_S, "alice's tracks ended")
        ended = [e for e in collector.events_of(EventType.TRACK_ENDED) if e.stream_id == "alice/video"]
        assert ended[0].attributes["participant"] == "alice"
        # carol keeps flowing after alice left
        before = len(collector.counters("carol/video"))
        wait_until(lambda: len(collector.counters("carol/video")) > before + 10, MEDIA_TIMEOUT_S, "carol after alice")
        assert not any(e.stream_id.startswith("carol/") for e in collector.events_of(EventType.TRACK_ENDED))
        joined = [e.attributes["participant"] for e in collector.events_of(EventType.PARTICIPANT_JOINED)]
        left = [e.attributes["participant"] for e in collector.events_of(EventType.PARTICIPANT_LEFT)]
        assert sorted(joined) == ["alice", "carol"] and left == ["alice"]
    finally:
        collector.close()

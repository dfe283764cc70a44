"""The bot notices losing its browser or being dropped from the room, rejoins, and capture resumes."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from protocol import EventType
from stages.browser.procs import browser_main_pids, chromium_pids, renderer_pids
from tests.roomfix import Collector, Room, room_fixture, wait_until  # noqa: F401  (pytest fixture)
from tests.sipfix import janus_fixture, netns_fixture  # noqa: F401  (pytest fixtures)

pytestmark = [pytest.mark.media, pytest.mark.timeout(120)]

ROOM_ID = 4401
MIN_FRAMES = 20
MEDIA_TIMEOUT_S = 40.0


def frames_after(collector: Collector, stream_id: str, t: float) -> list[float]:
    with collector._lock:
        return [at for at, _ in collector.streams[stream_id].counters if at > t]


def event_times(collector: Collector, kind: EventType, stream_id: str) -> list[float]:
    with collector._lock:
        return [at for at, e in collector.events if e.type == kind and e.stream_id == stream_id]


def readded_after(collector: Collector, stream_id: str, t_fault: float) -> float | None:
    """When the stream was announced again after the fault (its new session's TRACK_ADDED)."""
    times = [at for at in event_times(collector, EventType.TRACK_ADDED, stream_id) if at > t_fault]
    return times[0] if times else None


def resumed(collector: Collector, stream_id: str, t_fault: float, frames: int) -> bool:
    again = readded_after(collector, stream_id, t_fault)
    return again is not None and len(frames_after(collector, stream_id, again)) >= frames


def resumed_gap_s(collector: Collector, stream_id: str, t_fault: float) -> float:
    """Last frame of the old session to first frame of the new one."""
    again = readded_after(collector, stream_id, t_fault)
    assert again is not None
    with collector._lock:
        times = [at for at, _ in collector.streams[stream_id].counters]
    last_before = max(at for at in times if at <= t_fault)
    return min(at for at in times if at > again) - last_before


def states(collector: Collector) -> list[str]:
    return [e.attributes.get("state", "") for e in collector.events_of(EventType.STAGE_STATE)]


@pytest.mark.parametrize("victim", ["browser", "renderer"])
def test_browser_killed_mid_call_rejoins(room: Room, tmp_path: Path, victim: str) -> None:
    """SIGKILL of the whole browser, or of the page's renderer only (Playwright reports a page crash)."""
    room.participants(ROOM_ID, [("alice", 440.0)])
    out = f"ipc://{tmp_path}/bot.sock"
    collector = Collector(out)
    try:
        bot = room.bot(ROOM_ID, out)
        wait_until(lambda: len(collector.counters("alice/video")) >= MIN_FRAMES, MEDIA_TIMEOUT_S, "alice's video")
        find = browser_main_pids if victim == "browser" else renderer_pids
        victims = wait_until(lambda: find(bot.pid), 5, f"the bot's Chromium {victim}")
        t_kill = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: resumed(collector, "alice/video", t_kill, MIN_FRAMES), MEDIA_TIMEOUT_S,
                   "capture resumed after the browser was killed")
        gap = resumed_gap_s(collector, "alice/video", t_kill)
        print(f"\ncapture gap after killing Chromium's {victim}: {gap:.2f} s")
        assert "rejoining" in states(collector) and states(collector)[-1] == "joined"
        ended = [e for e in collector.events_of(EventType.TRACK_ENDED) if e.stream_id == "alice/video"]
        assert ended and ended[0].attributes["reason"] == "session ended"
        assert bot.poll() is None  # rejoined in-process, no restart needed
    finally:
        collector.close()


def janus_call(http_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(http_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return dict(json.loads(response.read()))


def kick(http_url: str, room: int, display: str) -> None:
    """Drop a participant from the room the way a moderator would (VideoRoom 'kick')."""
    session = janus_call(http_url, "", {"janus": "create", "transaction": "s"})["data"]["id"]
    handle = janus_call(http_url, f"/{session}", {"janus": "attach", "plugin": "janus.plugin.videoroom",
                                                  "transaction": "a"})["data"]["id"]

    def message(body: dict[str, Any]) -> dict[str, Any]:
        reply = janus_call(http_url, f"/{session}/{handle}", {"janus": "message", "transaction": "m", "body": body})
        return dict(reply["plugindata"]["data"])

    people = message({"request": "listparticipants", "room": room})["participants"]
    target = next(p["id"] for p in people if p.get("display") == display)
    assert message({"request": "kick", "room": room, "id": target}).get("videoroom") == "success"
    janus_call(http_url, f"/{session}", {"janus": "destroy", "transaction": "d"})


def test_bot_dropped_from_room_rejoins(room: Room, tmp_path: Path) -> None:
    room.participants(ROOM_ID, [("alice", 440.0)])
    out = f"ipc://{tmp_path}/bot.sock"
    collector = Collector(out)
    try:
        room.bot(ROOM_ID, out)
        wait_until(lambda: len(collector.counters("alice/video")) >= MIN_FRAMES, MEDIA_TIMEOUT_S, "alice's video")
        t_kick = time.monotonic()
        kick(room.janus.http_url, ROOM_ID, "bot")
        wait_until(lambda: resumed(collector, "alice/video", t_kick, MIN_FRAMES), MEDIA_TIMEOUT_S,
                   "capture resumed after the room dropped the bot")
        print(f"\ncapture gap after being kicked: {resumed_gap_s(collector, 'alice/video', t_kick):.2f} s")
        rejoin = [e for e in collector.events_of(EventType.STAGE_STATE) if e.attributes.get("state") == "rejoining"]
        assert rejoin and rejoin[0].attributes["reason"] == "dropped from the room"
    finally:
        collector.close()


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_bot_chromium_unprivileged_and_sandboxed(room: Room, tmp_path: Path) -> None:
    """Issue 12: while the bot captures the room, none of its Chromium processes runs as root or without its
    sandbox, and its renderers are confined by seccomp (what Chromium's sandbox does to a page)."""
    room.participants(ROOM_ID, [("alice", 440.0)])
    out = f"ipc://{tmp_path}/bot.sock"
    collector = Collector(out)
    try:
        bot = room.bot(ROOM_ID, out)
        wait_until(lambda: len(collector.counters("alice/video")) >= MIN_FRAMES, MEDIA_TIMEOUT_S, "alice's video")
        renderers = wait_until(lambda: renderer_pids(bot.pid), 5, "the bot's renderers")
        chromes = chromium_pids(bot.pid)
        assert browser_main_pids(bot.pid) and len(chromes) >= 3
        for pid in chromes:
            status = proc_status(pid)
            uids = [int(u) for u in status["Uid"].split()]
            gids = [int(g) for g in status["Gid"].split()]
            assert 0 not in uids and 0 not in gids, f"Chromium process {pid} runs as root: {status['Uid']}"
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"--no-sandbox" not in cmdline, f"Chromium process {pid} runs without its sandbox"
        for pid in renderers:
            # 2: a seccomp-bpf filter confines the renderer (0 without Chromium's sandbox).
            assert proc_status(pid)["Seccomp"] == "2", f"renderer {pid} is not confined by seccomp"
        # The stage itself (and Playwright's driver) keep running as the caller: only Chromium dropped privileges.
        assert proc_status(bot.pid)["Uid"].split()[0] == str(os.getuid())
    finally:
        collector.close()


def test_a_first_rejoin_waits_for_nothing_and_repeated_ones_back_off() -> None:
    """A single fault (a crashed renderer) is recovered at once; a page that keeps failing is retried ever slower."""
    from stages.browser.stage import MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S, rejoin_delay_s

    delays = [rejoin_delay_s(n) for n in range(1, 8)]
    assert delays[0] == 0.0
    assert delays[1] == RESTART_BACKOFF_S
    assert delays == sorted(delays)
    assert delays[-1] == MAX_RESTART_BACKOFF_S

"""Compose, speaker and mix decisions with a driven clock: time is advanced by the test, nothing sleeps.

Pictures are the project's test pattern (stages/pattern.py): each tile is told apart by its frame counter and by
its stream's colours, read back from the composite's pixels.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from protocol import AudioFrame, MediaHeader, Message, VideoFrame
from stages.pattern import PatternGenerator, i420_planes, read_counter
from stages.transformer import Compose, Speaker

VIDEO_TB = Fraction(1, 90000)


class DrivenClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now = start_s

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def video(stream_id: str, pattern: PatternGenerator, index: int, pts: int = 0) -> VideoFrame:
    header = MediaHeader(stream_id, index, pts, VIDEO_TB, 1)
    return VideoFrame(header, pattern.width, pattern.height, pattern.frame(index))


def videos(messages: list[Message]) -> list[VideoFrame]:
    return [m for m in messages if isinstance(m, VideoFrame)]


TICK_S = 0.05


def test_compose_is_led_by_its_fastest_camera_and_hands_over_when_it_stops() -> None:
    """A grid led by its slowest camera would move at 5 fps: the fastest stream leads instead (b at 20 fps, though
    listed second), one composite per b frame; when b stops, c (the next fastest) leads within a few of b's
    intervals, one composite per c frame, and a (5 fps) never leads."""
    size = 32
    clock = DrivenClock()
    compose = Compose(2, 2, 2 * size, 2 * size, ["a", "b", "c"], False, "grid", clock)
    patterns = {name: PatternGenerator(size, size, seed) for seed, name in enumerate("abc")}
    rates = {"a": 4, "b": 1, "c": 2}  # a frame every N ticks: 5, 20 and 10 fps
    b_stops_at, end = 60, 100
    leaders: list[tuple[int, str]] = []  # (tick, stream whose frame made a composite)
    sent = dict.fromkeys(rates, 0)
    for tick in range(end):
        for name, every in rates.items():
            if tick % every or (name == "b" and tick >= b_stops_at):
                continue
            out = videos(list(compose.process(video(name, patterns[name], sent[name], tick * 4500))))
            sent[name] += 1
            assert len(out) <= 1
            if out:
                assert out[0].header.pts == tick * 4500  # a composite carries its leader's timing
                leaders.append((tick, name))
        clock.advance(TICK_S)
    # b leads from its second frame (its interval is known then) until it stops: one composite per b frame.
    with_b = [name for tick, name in leaders if 2 <= tick < b_stops_at]
    assert with_b == ["b"] * (b_stops_at - 2), leaders[:20]
    # b is late by LEADER_STALL_INTERVALS of its 50 ms after 150 ms: c leads from its next frame on.
    after = [(tick, name) for tick, name in leaders if tick >= b_stops_at + 4]
    assert after == [(tick, "c") for tick in range(b_stops_at + 4, end, 2)], after
    assert "a" not in {name for tick, name in leaders if tick >= 2}


def speaker_run(turns: list[tuple[str, float]], step_s: float = 0.02) -> list[tuple[float, str]]:
    """Feed two participants' 20 ms audio frames (the talker a tone, the other silence) and a picture of each every
    third frame; return (time into the run, whose picture came out) for every output picture."""
    clock = DrivenClock()
    start = clock.now
    speaker = Speaker(32, 24, "room-video", clock)
    patterns = {"alice": PatternGenerator(32, 24, 0), "bob": PatternGenerator(32, 24, 1)}
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(960) / 48000)).astype(np.int16).tobytes()
    silence = bytes(960 * 2)
    shown: list[tuple[float, str]] = []
    tick = 0
    for talker, seconds in turns:
        for _ in range(round(seconds / step_s)):
            for person in patterns:
                header = MediaHeader(f"{person}/audio", tick, tick * 960, Fraction(1, 48000), 1)
                passed = list(speaker.process(AudioFrame(header, 48000, 1, 960, tone if person == talker else silence)))
                assert len(passed) == 1 and passed[0].header.stream_id == f"{person}/audio"  # audio passes through
            if tick % 3 == 0:
                for person, pattern in patterns.items():
                    for out in videos(list(speaker.process(video(f"{person}/video", pattern, tick)))):
                        assert out.header.stream_id == "room-video"
                        _, _, v = i420_planes(out.data, 32, 24)
                        who = next(p for p, pat in patterns.items()
                                   if np.array_equal(v, i420_planes(pat.frame(0), 32, 24)[2]))
                        shown.append((round(clock.now - start, 3), who))
            tick += 1
            clock.advance(step_s)
    return shown


def test_active_speaker_follows_the_loudest_participant_after_the_hold() -> None:
    """alice talks 2 s, then bob 2 s: alice's picture until bob has been clearly louder for the hold time
    (SPEAKER_HOLD_S after his level, smoothed, beats hers by the margin), then bob's; one switch, no flapping,
    one picture per video tick."""
    shown = speaker_run([("alice", 2.0), ("bob", 2.0)])
    assert len(shown) == len(range(0, 200, 3))
    who = [w for _, w in shown]
    switch = who.index("bob")
    assert set(who[:switch]) == {"alice"} and set(who[switch:]) == {"bob"}, shown
    switched_at = shown[switch][0]
    # The hold (0.6 s) plus the smoothing's settling: not before 2.6 s, well before the end of bob's turn.
    assert 2.6 <= switched_at <= 3.4, shown


def test_a_short_burst_does_not_take_the_picture() -> None:
    """A cough (bob loud for 0.3 s, less than the hold) while alice talks leaves alice's picture on."""
    shown = speaker_run([("alice", 1.0), ("bob", 0.3), ("alice", 1.0)])
    assert {w for _, w in shown} == {"alice"}, shown


def tile_counters_of(frame: VideoFrame, cols: int, rows: int) -> list[int | None]:
    y, _, _ = i420_planes(frame.data, frame.width, frame.height)
    h, w = y.shape
    return [read_counter(y[r * h // rows : (r + 1) * h // rows, c * w // cols : (c + 1) * w // cols])
            for r in range(rows) for c in range(cols)]


def test_a_stalled_camera_keeps_its_tile_until_its_stream_ends() -> None:
    """The cause of alice's empty tile under load (issue 9): her stream stalled for over a second (a decoder waiting
    for a keyframe after a lost packet, a starved process), and the grid blanked every tile whose newest frame was
    older than STALE_STREAM_S, although she was still in the call. A tile now keeps its last picture while its
    stream lasts, shows the new ones as soon as they come again, and is freed only by the stream's end."""
    size = 64
    clock = DrivenClock()
    compose = Compose(2, 2, 2 * size, 2 * size, ["alice", "bob", "carol"], False, "grid", clock)
    patterns = {name: PatternGenerator(size, size, seed) for seed, name in enumerate(("alice", "bob", "carol"))}
    sent = dict.fromkeys(patterns, 0)
    seen: list[tuple[float, list[int | None]]] = []

    def step(who: list[str]) -> None:
        for name in who:
            sent[name] += 1
            for out in videos(list(compose.process(video(name, patterns[name], sent[name])))):
                seen.append((clock.now, tile_counters_of(out, 2, 2)))
        clock.advance(0.1)

    for _ in range(10):
        step(["alice", "bob", "carol"])
    stalled_from = len(seen)
    for _ in range(20):  # 2 s without a frame of alice's
        step(["bob", "carol"])
    during = seen[stalled_from:]
    assert during and all(counters[0] == sent["alice"] for _, counters in during), during
    assert [c[1] for _, c in during] == sorted({c[1] for _, c in during})  # bob's tile moves on meanwhile
    resumed_from = len(seen)
    for _ in range(3):
        step(["alice", "bob", "carol"])
    assert [c[0] for _, c in seen[resumed_from:]][-1] == sent["alice"]
    compose.flush("alice")  # her stream ended: her tile is black from the next composite on
    step(["bob", "carol"])
    assert seen[-1][1][0] == 0 and seen[-1][1][1] == sent["bob"]

"""Compose, speaker and mix decisions with a driven clock: time is advanced by the test, nothing sleeps.

Pictures are the project's test pattern (stages/pattern.py): each tile is told apart by its frame counter and by
its stream's colours, read back from the composite's pixels.
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from protocol import AudioFrame, MediaHeader, Message, VideoFrame
from sipbridge.bridge import BridgeConfigError, bridge_stages, parse_bridge
from stages.base import StageOptions
from stages.bitmapfont import text_mask
from stages.pattern import PatternGenerator, i420_planes, read_counter
from stages.transformer import (
    Compose,
    GridOptions,
    Mix,
    RoomGrid,
    Speaker,
    TransformerStage,
    cell_rects,
    label_box,
    parse_transform,
)

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


def test_a_composite_is_as_old_as_its_newest_picture() -> None:
    """A composite carries the capture time of the picture that just changed, not of a slower camera's repeated
    tile: a 5 fps camera's tile is up to 200 ms old by its frame rate alone, and the janus stage would hold the
    call's audio that much longer to match (issue 9's late lip sync under load)."""
    size = 32
    clock = DrivenClock()
    compose = Compose(2, 1, 2 * size, size, ["fast", "slow"], False, "grid", clock)
    patterns = {name: PatternGenerator(size, size, seed) for seed, name in enumerate(("fast", "slow"))}
    ages_ms = []
    for tick in range(60):  # 30 fps and 5 fps for 2 s; each picture captured 40 ms before it arrives
        now_ns = 10**12 + tick * 33_333_333
        for name, every in (("slow", 6), ("fast", 1)):
            if tick % every == 0:
                frame = video(name, patterns[name], tick)
                header = MediaHeader(name, tick, tick * 3000, VIDEO_TB, now_ns - 40_000_000)
                for out in videos(list(compose.process(VideoFrame(header, size, size, frame.data)))):
                    ages_ms.append((now_ns - out.header.capture_time_ns) / 1e6)
        clock.advance(1 / 30)
    assert len(ages_ms) >= 50
    assert max(ages_ms) == pytest.approx(40.0), ages_ms


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


# ----- the room grid ---------------------------------------------------------------------------------------------
W, H = 640, 480
CAM_W, CAM_H = 320, 240
PEOPLE = ["alice", "bob", "carol", "dave", "eve"]


def person_frame(who: str, index: int, pattern: dict[str, PatternGenerator] = {}) -> VideoFrame:  # noqa: B006
    """Frame ``index`` of a person's camera: the counter reads 1000 * (their place in PEOPLE) + index."""
    seed = PEOPLE.index(who)
    gen = pattern.setdefault(who, PatternGenerator(CAM_W, CAM_H, seed))
    return video(f"{who}/video", gen, 1000 * seed + index)


def pictures(frame: VideoFrame, rects: list[tuple[int, int, int, int]]) -> list[str | None]:
    """Whose picture each rectangle of a composite shows, from the counter in it (None: unreadable or black)."""
    y, _, _ = i420_planes(frame.data, frame.width, frame.height)
    out: list[str | None] = []
    for x, top, w, h in rects:
        counter = read_counter(y[top : top + h, x : x + w])
        out.append(PEOPLE[counter // 1000] if counter and counter // 1000 < len(PEOPLE) else None)
    return out


def outside_is_black(frame: VideoFrame, rects: list[tuple[int, int, int, int]]) -> bool:
    y, _, _ = i420_planes(frame.data, frame.width, frame.height)
    mask = np.ones(y.shape, dtype=bool)
    for x, top, w, h in rects:
        mask[top : top + h, x : x + w] = False
    return bool((y[mask] == 16).all())


def grid_with(people: list[str], clock: DrivenClock, **kwargs: object) -> tuple[RoomGrid, VideoFrame]:
    """A room grid fed one frame of each person in turn; returns it and its newest composite."""
    grid = RoomGrid(W, H, kwargs.pop("max_tiles", 4), None, "room-video",  # type: ignore[arg-type]
                    GridOptions(**kwargs), clock)  # type: ignore[arg-type]
    last: VideoFrame | None = None
    for index in range(1, 4):
        for who in people:
            for out in videos(list(grid.process(person_frame(who, index)))):
                last = out
            clock.advance(0.02)
    assert last is not None
    return grid, last


# Letterboxed 4:3 cameras in a 640x480 picture: where each one's picture lies, for 1 to 5 people.
EXPECTED_PICTURES = {
    1: [(0, 0, 640, 480)],
    2: [(0, 120, 320, 240), (320, 120, 320, 240)],  # side by side, bars above and below: no empty half
    3: [(0, 0, 320, 240), (320, 0, 320, 240), (0, 240, 320, 240)],
    4: [(0, 0, 320, 240), (320, 0, 320, 240), (0, 240, 320, 240), (320, 240, 320, 240)],
    5: [(0, 0, 212, 158), (212, 0, 212, 158), (426, 0, 212, 158), (0, 160, 212, 158), (212, 160, 212, 158)],
}


def test_room_grid_geometry_follows_the_number_of_people() -> None:
    """1 full frame, 2 side by side, 3-4 in 2x2, 5 in 3x3; every picture keeps its 4:3 shape (letterbox); nothing
    but black outside the pictures (names off here)."""
    for count, rects in EXPECTED_PICTURES.items():
        people = PEOPLE[:count]
        grid, composite = grid_with(people, DrivenClock(), names=False, max_tiles=9)
        assert (composite.width, composite.height) == (W, H)
        assert pictures(composite, rects) == people, (count, pictures(composite, rects))
        assert outside_is_black(composite, rects), count
        assert grid.figures()["grid_layout"] == {1: "1x1", 2: "2x1", 3: "2x2", 4: "2x2", 5: "3x3"}[count]


def test_room_grid_stretch_fills_each_cell() -> None:
    _grid, composite = grid_with(["alice", "bob"], DrivenClock(), names=False, fit="stretch")
    y, _, _ = i420_planes(composite.data, W, H)
    assert pictures(composite, [(0, 0, 320, 480), (320, 0, 320, 480)]) == ["alice", "bob"]
    assert (y[:, :] != 16).mean() > 0.5  # no bars: the counter band starts at the top of the frame


def test_room_grid_names_each_tile_without_covering_the_counter() -> None:
    """Each tile carries its participant's name: in the bar under a letterboxed picture, else over the picture's
    lower left (clear of its top eighth, where the counter is read, and of its bottom eighth)."""
    for people, rects in ((["alice", "bob"], EXPECTED_PICTURES[2]), (PEOPLE[:4], EXPECTED_PICTURES[4])):
        grid, composite = grid_with(people, DrivenClock())
        y, _, _ = i420_planes(composite.data, W, H)
        assert pictures(composite, rects) == people  # counters still read
        cols, rows = grid.layout
        for who, cell, rect in zip(people, cell_rects(cols, rows, W, H), rects, strict=False):
            label = label_box(rect, cell, who)
            assert label is not None
            (bx, by, _bw, bh), text, scale = label
            assert text == who
            mask = text_mask(who, scale)
            region = y[by + 2 * scale : by + 2 * scale + mask.shape[0], bx + 2 * scale : bx + 2 * scale + mask.shape[1]]
            assert (region[mask] == 235).all() and (region[~mask] == 40).all(), who  # the name, on its box
            _px, py, _pw, ph = rect
            if len(people) == 2:
                assert by >= py + ph  # in the bar below the picture
            else:
                assert py + ph // 8 < by and by + bh <= py + ph - ph // 8


def test_room_grid_churn_five_people_through_four_tiles() -> None:
    """Issue 14's room: alice and bob join and leave, carol and dave join, then eve: eve is shown (the departed
    freed their tiles); carol and dave leave: eve alone, full frame. An empty grid sends the slate."""
    clock = DrivenClock()
    grid = RoomGrid(W, H, 4, None, "room-video", GridOptions(names=False, title="room 1234"), clock)
    index = 0

    def frames(people: list[str]) -> VideoFrame:
        nonlocal index
        last = None
        for _ in range(3):
            index += 1
            for who in people:
                for out in videos(list(grid.process(person_frame(who, index)))):
                    last = out
                clock.advance(0.02)
        assert last is not None, people
        return last

    assert pictures(frames(["alice", "bob"]), EXPECTED_PICTURES[2]) == ["alice", "bob"]
    grid.flush("alice/video")
    assert pictures(frames(["bob"]), EXPECTED_PICTURES[1]) == ["bob"]
    grid.flush("bob/video")
    clock.advance(0.1)
    slate = grid.tick()
    assert len(slate) == 1 and is_slate(videos(slate)[0], "room 1234")
    assert pictures(frames(["carol", "dave"]), EXPECTED_PICTURES[2]) == ["carol", "dave"]
    composite = frames(["carol", "dave", "eve"])
    assert pictures(composite, EXPECTED_PICTURES[4]) == ["carol", "dave", "eve", None]
    assert outside_is_black(composite, EXPECTED_PICTURES[3])
    grid.flush("carol/video")
    grid.flush("dave/video")
    composite = frames(["eve"])
    assert pictures(composite, EXPECTED_PICTURES[1]) == ["eve"]
    assert list(grid.figures()["compose_slots"]) == ["eve/video"]  # the departed leave nothing behind


def test_room_grid_refuses_an_odd_sized_picture_and_goes_on() -> None:
    clock = DrivenClock()
    grid, _ = grid_with(["alice"], clock, names=False)
    odd = VideoFrame(MediaHeader("bob/video", 1, 0, VIDEO_TB, 1), 33, 25, bytes(33 * 25 + 2 * 17 * 13))
    with pytest.raises(ValueError, match="even size"):
        grid.process(odd)
    out = videos(list(grid.process(person_frame("alice", 9))))
    assert out and pictures(out[0], EXPECTED_PICTURES[1]) == ["alice"]


def test_room_grid_a_leaver_frees_the_tile_and_a_newcomer_takes_it() -> None:
    """Four people in 2x2; bob leaves: his cell is black at once, the others stay where they were; eve joins:
    she takes bob's cell."""
    clock = DrivenClock()
    grid, _ = grid_with(PEOPLE[:4], clock, names=False)
    grid.flush("bob/video")
    out = videos(list(grid.process(person_frame("alice", 10))))
    assert out and pictures(out[0], EXPECTED_PICTURES[4]) == ["alice", None, "carol", "dave"]
    composite = None
    for index in range(11, 14):
        for who in ("alice", "carol", "dave", "eve"):
            for frame in videos(list(grid.process(person_frame(who, index)))):
                composite = frame
            clock.advance(0.02)
    assert composite is not None
    assert pictures(composite, EXPECTED_PICTURES[4]) == ["alice", "eve", "carol", "dave"]


def talk(grid: RoomGrid, clock: DrivenClock, talker: str | None, seconds: float, people: list[str]) -> None:
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(960) / 48000)).astype(np.int16).tobytes()
    silence = bytes(960 * 2)
    for tick in range(round(seconds / 0.02)):
        for who in people:
            header = MediaHeader(f"{who}/audio", tick, tick * 960, Fraction(1, 48000), 1)
            grid.process(AudioFrame(header, 48000, 1, 960, tone if who == talker else silence))
        if tick % 3 == 0:
            for who in people:
                grid.process(person_frame(who, 100 + tick))
        clock.advance(0.02)


def test_room_grid_beyond_its_tiles_the_most_recent_speakers_win() -> None:
    """Five people, four tiles: without anyone speaking the four most recent arrivals are shown (not alice, the
    first); when alice talks (longer than the hold) she takes the tile of the one who spoke least recently."""
    clock = DrivenClock()
    grid, composite = grid_with(PEOPLE, clock, names=False)
    assert sorted(p for p in pictures(composite, EXPECTED_PICTURES[4]) if p) == ["bob", "carol", "dave", "eve"]
    talk(grid, clock, "carol", 1.0, PEOPLE)
    talk(grid, clock, "dave", 1.0, PEOPLE)
    talk(grid, clock, "eve", 1.0, PEOPLE)
    talk(grid, clock, "bob", 1.0, PEOPLE)
    talk(grid, clock, "alice", 0.3, PEOPLE)  # shorter than the hold: a cough takes no tile
    assert "alice" not in grid.figures()["grid_tiles"]
    talk(grid, clock, "alice", 1.0, PEOPLE)
    tiles = grid.figures()["grid_tiles"]
    assert sorted(tiles) == ["alice", "bob", "dave", "eve"], tiles  # carol spoke least recently
    out = [f for who in PEOPLE for f in videos(list(grid.process(person_frame(who, 500))))]
    assert out and sorted(p for p in pictures(out[-1], EXPECTED_PICTURES[4]) if p) == ["alice", "bob", "dave", "eve"]


def is_slate(frame: VideoFrame, title: str) -> bool:
    """The empty room's picture: black but for the two lines of text, in the middle band, written in the font."""
    y, _, _ = i420_planes(frame.data, frame.width, frame.height)
    scale = max(1, frame.height // 160)
    top = int(frame.height * 0.38)
    for line in ("waiting for participants", title):
        mask = text_mask(line, scale)
        x = (frame.width - mask.shape[1]) // 2
        region = y[top : top + mask.shape[0], x : x + mask.shape[1]]
        if not ((region[mask] == 235).all() and (region[~mask] == 16).all()):
            return False
        top += (7 + 3) * scale
    return bool((y[: int(frame.height * 0.38)] == 16).all() and (y[top:] == 16).all())


def test_an_empty_room_grid_sends_a_slate_at_its_frame_rate() -> None:
    clock = DrivenClock()
    grid = RoomGrid(W, H, 4, None, "room-video", GridOptions(title="Room 1234", fps=10.0), clock)
    sent = []
    for _ in range(100):  # 1 s of 10 ms ticks
        sent += videos(grid.tick())
        clock.advance(0.01)
    assert len(sent) == 10 and all(is_slate(f, "Room 1234") for f in sent)
    pts = [f.header.pts for f in sent]
    assert all(b - a == 9000 for a, b in itertools.pairwise(pts)), pts  # 1/10 s apart in 1/90000
    grid.process(person_frame("alice", 1))
    assert grid.tick() == []  # someone is shown and sending: no slate, no repeat
    repeats: list[VideoFrame] = []
    for _ in range(200):  # 2 s of ticks without a frame: every camera stalled
        repeats += videos(grid.tick())
        clock.advance(0.01)
    # The last grid again, from 0.5 s on, once per 0.5 s: video keeps flowing, at a rate that costs little.
    assert len(repeats) == 3 and all(pictures(r, EXPECTED_PICTURES[1]) == ["alice"] for r in repeats)
    assert [b.header.pts - a.header.pts for a, b in itertools.pairwise(repeats)] == [45000, 45000]


def test_pinned_room_grid_keeps_places_and_a_stalled_camera() -> None:
    """With stream ids the grid is pinned: those people in that order, in a grid sized for them, black while one
    is away; a stalled camera keeps its picture (issue 9)."""
    clock = DrivenClock()
    ids = ["alice/video", "bob/video", "carol/video"]
    grid = RoomGrid(W, H, 4, ids, "room-video", GridOptions(names=False), clock)
    last = None
    for index in range(1, 30):
        for who in ("bob", "carol") if index > 5 else ("alice", "bob", "carol"):
            for out in videos(list(grid.process(person_frame(who, index)))):
                last = out
            clock.advance(0.033)
    assert last is not None
    y, _, _ = i420_planes(last.data, W, H)
    assert read_counter(y[:240, :320]) == 5  # alice's last picture, 2.5 s later
    assert pictures(last, EXPECTED_PICTURES[4]) == ["alice", "bob", "carol", None]
    passed = list(grid.process(person_frame("dave", 1)))
    assert len(passed) == 1 and passed[0].header.stream_id == "dave/video"  # not one of ours: passed on


def test_mix_sends_silence_while_the_room_is_empty() -> None:
    """No stream to mix (none yet, or all ended): 20 ms chunks of silence on the clock's grid, pts continuous;
    none while a stream is live."""
    clock = DrivenClock()
    mix = Mix(8000, "room-audio", clock)
    chunks: list[AudioFrame] = []
    for _ in range(50):  # 0.5 s of 10 ms ticks
        chunks += [m for m in mix.tick() if isinstance(m, AudioFrame)]
        clock.advance(0.01)
    assert len(chunks) == 25 and all(c.samples == 160 and not np.frombuffer(c.data, np.int16).any() for c in chunks)
    assert [c.header.pts for c in chunks] == [160 * i for i in range(25)]
    header = MediaHeader("alice/audio", 0, 0, Fraction(1, 8000), 1)
    tone = (3000 * np.sin(np.arange(160))).astype(np.int16)
    mixed = [m for m in mix.process(AudioFrame(header, 8000, 1, 160, tone.tobytes())) if isinstance(m, AudioFrame)]
    assert len(mixed) == 1 and mixed[0].header.pts == 160 * 25 and np.array_equal(
        np.frombuffer(mixed[0].data, np.int16), tone)
    clock.advance(0.1)
    assert mix.tick() == []  # alice is live
    assert list(mix.flush("alice/audio")) == []
    clock.advance(0.04)
    after = mix.tick()
    assert len(after) == 1 and after[0].header.pts == 160 * 26


def test_mix_goes_on_with_silence_while_every_live_stream_stalls() -> None:
    """A stream that stops sending without ending (a departed participant whose end is still on its way, 45 s once on
    a loaded machine) must not silence the SIP line: after MIX_STALL_S without audio in, silence on the clock's grid
    (what was buffered mixed in), and the stream's own audio again as soon as it comes."""
    from stages.transformer import MIX_STALL_S

    clock = DrivenClock()
    mix = Mix(8000, "room-audio", clock)
    tone = (3000 * np.sin(np.arange(160))).astype(np.int16)
    out: list[AudioFrame] = []
    for seq in range(5):  # alice speaks for 100 ms ...
        header = MediaHeader("alice/audio", seq, 160 * seq, Fraction(1, 8000), 1)
        out += [m for m in mix.process(AudioFrame(header, 8000, 1, 160, tone.tobytes())) if isinstance(m, AudioFrame)]
        clock.advance(0.02)
    header = MediaHeader("alice/audio", 5, 800, Fraction(1, 8000), 1)
    out += [m for m in mix.process(AudioFrame(header, 8000, 1, 80, tone[:80].tobytes())) if isinstance(m, AudioFrame)]
    assert len(out) == 5
    stalled: list[AudioFrame] = []
    for _ in range(round(MIX_STALL_S / 0.01) - 1):  # ... then nothing, and no end: nothing yet (a late packet)
        stalled += [m for m in mix.tick() if isinstance(m, AudioFrame)]
        clock.advance(0.01)
    assert stalled == []
    for _ in range(100):  # 1 s of 10 ms ticks past the stall
        clock.advance(0.01)
        stalled += [m for m in mix.tick() if isinstance(m, AudioFrame)]
    assert 48 <= len(stalled) <= 52, len(stalled)
    first = np.frombuffer(stalled[0].data, np.int16)
    assert np.array_equal(first[:80], tone[:80]) and not first[80:].any()  # the buffered half chunk, then silence
    assert not any(np.frombuffer(c.data, np.int16).any() for c in stalled[1:])
    assert [c.header.pts for c in stalled] == [160 * (5 + i) for i in range(len(stalled))]
    header = MediaHeader("alice/audio", 6, 880, Fraction(1, 8000), 1)
    back = [m for m in mix.process(AudioFrame(header, 8000, 1, 160, tone.tobytes())) if isinstance(m, AudioFrame)]
    assert len(back) == 1 and np.array_equal(np.frombuffer(back[0].data, np.int16), tone)
    clock.advance(0.1)
    assert mix.tick() == []  # she sends again: no filler


# ----- the bridge's [layout] -------------------------------------------------------------------------------------
def room_transformer_args(layout: dict[str, object], tmp_path: Path) -> list[str]:
    data = {"room": {"url": "http://127.0.0.1:8080/", "vars": {"room": "1234"}},
            "sip": {"call": "sip:echo@127.0.0.1"}, "media": {"to_sip": {"fps": 12}}, "layout": layout}
    specs = {s.name: s for s in bridge_stages(parse_bridge(data), tmp_path)}
    return specs["room-transformer"].args


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_bridge_layout_options_reach_the_room_grid(tmp_path: Path) -> None:
    """[layout] grid: the room grid with names on, letterbox, the room variable on the slate, the SIP frame rate
    for slates; mix at the SIP rate from the start (silence before anyone speaks). single: one tile, no names.
    names, fit and title are settings; a wrong fit names the key."""
    args = room_transformer_args({"mode": "grid", "max_tiles": 6}, tmp_path)
    assert option(args, "--video") == "compose:grid:640x480:6"
    assert "--tile-names" in args and option(args, "--fit") == "letterbox"
    assert option(args, "--slate-title") == "1234" and option(args, "--grid-fps") == "12"
    assert "mix:8000" in args
    args = room_transformer_args({"mode": "single", "participants": ["bob/video"]}, tmp_path)
    assert option(args, "--video") == "compose:grid:640x480:1:bob/video" and "--no-tile-names" in args
    args = room_transformer_args({"mode": "grid", "names": False, "fit": "stretch", "title": "Sales"}, tmp_path)
    assert "--no-tile-names" in args and option(args, "--fit") == "stretch" and option(args, "--slate-title") == "Sales"
    grid = parse_transform(option(args, "--video"), "room-video", GridOptions(names=False, fit="stretch"))
    assert isinstance(grid, RoomGrid) and grid.max_tiles == 4 and grid.options.fit == "stretch"
    args = room_transformer_args({"mode": "speaker", "title": "Sales"}, tmp_path)
    assert option(args, "--video") == "compose:speaker:640x480" and "--slate" in args  # a slate in every layout
    assert option(args, "--slate-title") == "Sales" and option(args, "--grid-fps") == "12"
    with pytest.raises(BridgeConfigError, match=r"layout\.fit"):
        room_transformer_args({"fit": "zoom"}, tmp_path)


def keepalive_run(make: object) -> None:
    """Slate while nobody sends video, nothing of its own while live pictures go out, the last picture once per
    0.5 s while the camera stalls, the slate again once its stream ended."""
    clock = DrivenClock()
    compose = make(clock)  # type: ignore[operator]

    def ticks(seconds: float) -> list[VideoFrame]:
        out: list[VideoFrame] = []
        for _ in range(round(seconds / 0.01)):
            out += videos(compose.tick())
            clock.advance(0.01)
        return out

    slates = ticks(1.0)
    assert len(slates) == 10 and all(is_slate(f, "Room 7") for f in slates)
    live: list[VideoFrame] = []
    for index in range(1, 16):
        live += videos(list(compose.process(person_frame("alice", index))))
        live += ticks(0.05)
    assert len(live) == 15 and not any(is_slate(f, "Room 7") for f in live)
    assert pictures(live[-1], EXPECTED_PICTURES[1]) == ["alice"]
    repeats = ticks(2.0)  # 0.05 to 2.05 s after alice's last frame: repeats at 0.5, 1, 1.5 and 2 s
    assert len(repeats) == 4 and all(pictures(r, EXPECTED_PICTURES[1]) == ["alice"] for r in repeats)
    compose.flush("alice/video")
    again = ticks(0.5)
    assert len(again) == 5 and all(is_slate(f, "Room 7") for f in again)
    pts = [f.header.pts for f in slates + live + repeats + again]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)  # one clock, whatever the picture


def test_speaker_and_active_grid_keep_video_going_with_a_slate() -> None:
    options = GridOptions(title="Room 7", fps=10.0, slate=True)
    keepalive_run(lambda clock: Speaker(W, H, "room-video", clock, keepalive=options))
    keepalive_run(lambda clock: Compose(1, 1, W, H, None, True, "room-video", clock, keepalive=options))
    assert parse_transform("compose:speaker:640x480", "v", options).keepalive is not None  # type: ignore[attr-defined]
    assert parse_transform("compose:speaker:640x480", "v", GridOptions()).keepalive is None  # type: ignore[attr-defined]


def test_pinned_place_follows_a_participants_new_track() -> None:
    """A page that renegotiates gives alice a second track before her first has ended; the browser stage names
    it alice/video2. Her pinned place shows the newer stream (not a black cell while 'alice/video2' passes by
    uncomposed), and still does once the old stream ends."""
    clock = DrivenClock()
    grid = RoomGrid(W, H, 4, ["alice/video", "bob/video"], "room-video", GridOptions(names=False), clock)
    alice2 = PatternGenerator(CAM_W, CAM_H, 0)

    def round_of(index: int, alice_sid: str) -> VideoFrame | None:
        last = None
        frames = ((alice_sid, video(alice_sid, alice2, 500 + index)), ("bob/video", person_frame("bob", index)))
        for sid, frame in frames:
            for out in videos(list(grid.process(frame))):
                assert out.header.stream_id == "room-video", sid
                last = out
            clock.advance(0.03)
        return last

    for index in range(1, 4):
        round_of(index, "alice/video")
    for index in range(4, 8):
        composite = round_of(index, "alice/video2")
    assert composite is not None
    y, _, _ = i420_planes(composite.data, W, H)
    assert read_counter(y[120:360, :320]) == 507  # alice's new track, in her place (2x1, letterboxed)
    grid.flush("alice/video")
    composite = round_of(8, "alice/video2")
    assert composite is not None
    y, _, _ = i420_planes(composite.data, W, H)
    assert read_counter(y[120:360, :320]) == 508 and pictures(composite, EXPECTED_PICTURES[2])[1] == "bob"


def test_resample_then_mix_sends_each_chunk_with_the_input_frame_that_completes_it() -> None:
    """The room's 20 ms frames at 48 kHz, resampled to the SIP rate and mixed: one 20 ms chunk leaves per input
    frame, stamped with that frame's capture time. libswresample holds the last samples of every input back, and
    without priming each chunk ended in the next frame and waited 20 ms for it (room -> SIP audio latency)."""
    rate_in, rate_out, n = 48_000, 8000, 960
    resample, mix = parse_transform(f"resample:{rate_out}", "room-audio"), Mix(rate_out, "room-audio", DrivenClock())
    click_at = 5 * n + 300
    signal = np.zeros(n * 12, dtype=np.int16)
    signal[click_at - 2 : click_at + 3] = 20_000
    chunks: list[AudioFrame] = []
    for i in range(12):
        header = MediaHeader("alice/audio", i, i * n, Fraction(1, rate_in), 7_000_000 + i)
        frame = AudioFrame(header, rate_in, 1, n, signal[i * n : (i + 1) * n].tobytes())
        out = [m for r in resample.process(frame) for m in mix.process(r) if isinstance(m, AudioFrame)]
        assert [(c.samples, c.header.capture_time_ns) for c in out] == [(160, 7_000_000 + i)], (i, out)
        chunks += out
    mixed = np.concatenate([np.frombuffer(c.data, np.int16) for c in chunks]).astype(np.int32)
    shift_s = int(np.argmax(np.abs(mixed))) / rate_out - click_at / rate_in
    assert 0 <= shift_s <= 0.0025, shift_s  # the output runs 2 ms behind its input, no more


def test_ticks_come_when_a_transform_has_something_to_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """The transformer's ticks (slates, silence, repeats) are a codec-thread hand-off each: the stage ticks when the
    soonest transform may send something, within [TICK_INTERVAL_S, IDLE_TICK_INTERVAL_S]. Driven clock: the empty
    room's slate at 30 fps (a tick per slate, each on time), a camera whose frames keep coming (ticks at the idle
    interval), its stall (a repeat half a second after its last frame, then every half second)."""
    import asyncio

    from stages import transformer

    clock = DrivenClock()
    grid = RoomGrid(640, 480, 1, None, "room-video", GridOptions(names=False, title="room 1", fps=30.0), clock)
    stage = TransformerStage(StageOptions(name="room-transformer"), [grid], 1)
    stage._consumers = 1
    emitted: list[tuple[float, Message]] = []
    frames = iter(range(1, 1000))
    sleeps: list[float] = []

    def emit(msg: Message) -> bool:  # the codec thread sends what a tick made
        emitted.append((clock(), msg))
        return True

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)
        if 1.0 <= clock() - start < 2.0:  # a camera at 30 fps: its frames go out as they come, ticks make none
            while grid.slots.get("alice/video") is None or clock() - grid.slots["alice/video"].last_seen >= 1 / 30:
                list(grid.process(person_frame("alice", next(frames))))
        if clock() - start >= 3.2:
            raise asyncio.CancelledError

    async def drive() -> None:
        with pytest.raises(asyncio.CancelledError):
            await stage.produce()

    start = clock()
    monkeypatch.setattr(stage, "_emit_now", emit)
    monkeypatch.setattr(transformer.asyncio, "sleep", sleep)
    asyncio.run(drive())
    slates = [t - start for t, _ in emitted if t - start < 1.0]
    # A tick per slate, then at the idle interval: 3.2 s took 320 ticks at a fixed TICK_INTERVAL_S.
    assert len(slates) == 30 and stage.ticks <= 80, (len(slates), stage.ticks)
    assert all(abs(b - a - 1 / 30) < 0.011 for a, b in itertools.pairwise(slates)), slates
    live_ticks = [s for s in sleeps[len(slates):] if s == transformer.IDLE_TICK_INTERVAL_S]
    assert not [t for t, _ in emitted if 1.0 <= t - start < 2.0] and len(live_ticks) >= 18
    repeats = [t - start for t, _ in emitted if t - start >= 2.0]
    assert len(repeats) == 2 and 2.4 < repeats[0] < 2.56 and repeats[1] - repeats[0] == pytest.approx(0.5), repeats

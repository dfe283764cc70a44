"""Multi-process pipelines of real stage processes on ipc:// endpoints."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import protocol
from protocol import AudioFrame, MediaHeader, VideoFrame
from stages.pattern import PatternGenerator, i420_planes, read_counter
from tests.stagehelp import Collector, Feeder, StatsWatcher, stage_procs

pytestmark = pytest.mark.timeout(120)
STAGE_START_TIMEOUT_S = 30.0


def test_source_transformer_sink_counters_in_order_and_clean_exit(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    with stage_procs(tmp_path) as procs:
        procs.start(
            "sink", "sink", "--in", procs.endpoint("transformer"), "--report", str(report), "--video-policy", "all"
        )
        procs.start("transformer", "transformer", "--in", procs.endpoint("source"), "--video-policy", "all")
        procs.start(
            "source",
            "source",
            "--frames",
            "45",
            "--video-streams",
            "2",
            "--audio-streams",
            "1",
            "--width",
            "320",
            "--height",
            "240",
            "--video-policy",
            "all",
        )
        codes = procs.wait_all()
    assert codes == {"sink": 0, "transformer": 0, "source": 0}, codes
    summary = json.loads(report.read_text())
    for sid in ("video0", "video1"):
        video = summary["video"][sid]
        assert video["frames"] == 45
        assert (video["first_counter"], video["last_counter"]) == (0, 44)
        assert video["missing"] == video["out_of_order"] == video["duplicates"] == video["unreadable"] == 0
        assert video["latency_ms_p50"] is not None and video["latency_ms_p50"] > 0
    audio = summary["audio"]["audio0"]
    assert audio["samples"] == 48000 * 45 // 30 and audio["pts_gaps"] == 0
    assert abs(audio["frequency_hz"] - 440.0) < 1.0


def _expected(seq: int, seed: int, width: int, height: int) -> VideoFrame:
    data = PatternGenerator(width, height, seed).frame(seq)
    return VideoFrame(MediaHeader("x", seq, 0, protocol.wire.Fraction(1, 30), 0), width, height, data)


def test_crop_resize_and_split_pixels(tmp_path: Path) -> None:
    """A 2x2 split of a crop, and a resize: every tile equals its region of the regenerated source frame."""
    from stages.transformer import crop_i420, resize_i420

    with stage_procs(tmp_path) as procs:
        split_out = Collector(procs.endpoint("split"))
        resize_out = Collector(procs.endpoint("resize"))
        procs.start(
            "transformer",
            "split",
            "--in",
            procs.endpoint("source"),
            "--video",
            "crop:0,0,320,240",
            "--video",
            "split:2x2",
            "--video-policy",
            "all",
        )
        procs.start(
            "transformer",
            "resize",
            "--in",
            procs.endpoint("source2"),
            "--video",
            "resize:160x120",
            "--video-policy",
            "all",
        )
        procs.start(
            "source",
            "source",
            "--frames",
            "6",
            "--width",
            "640",
            "--height",
            "480",
            "--audio-streams",
            "0",
            "--video-policy",
            "all",
            "--as-fast-as-possible",
        )
        procs.start(
            "source",
            "source2",
            "--frames",
            "6",
            "--width",
            "640",
            "--height",
            "480",
            "--audio-streams",
            "0",
            "--video-policy",
            "all",
            "--as-fast-as-possible",
        )
        tiles = [m for m in split_out.until_end() if isinstance(m, VideoFrame)]
        resized = [m for m in resize_out.until_end() if isinstance(m, VideoFrame)]
        assert procs.wait_all() == {"split": 0, "resize": 0, "source": 0, "source2": 0}
    assert len(tiles) == 6 * 4
    assert {t.header.stream_id for t in tiles} == {f"video0/tile{i}" for i in range(4)}
    for tile in tiles:
        index = int(tile.header.stream_id[-1])
        source = _expected(tile.header.seq, 0, 640, 480)
        cropped = VideoFrame(source.header, 320, 240, crop_i420(source, 0, 0, 320, 240))
        expected = crop_i420(cropped, (index % 2) * 160, (index // 2) * 120, 160, 120)
        assert (tile.width, tile.height) == (160, 120)
        assert np.array_equal(np.frombuffer(tile.data, np.uint8), expected), tile.header
    assert len(resized) == 6
    for frame in resized:
        source = _expected(frame.header.seq, 0, 640, 480)
        reference = resize_i420(source.data, 640, 480, 160, 120)
        got = np.frombuffer(frame.data, np.uint8)
        assert got.size == 160 * 120 * 3 // 2
        assert np.abs(got.astype(int) - reference.astype(int)).max() <= 1
        y, _, _ = i420_planes(frame.data, 160, 120)
        assert read_counter(y) == frame.header.seq


def test_compose_then_split_restores_each_participant(tmp_path: Path) -> None:
    """Four streams composed into a 2x2 grid and split again: each tile carries its own stream's counter."""
    with stage_procs(tmp_path) as procs:
        out = Collector(procs.endpoint("split"))
        procs.start(
            "transformer", "split", "--in", procs.endpoint("compose"), "--video", "split:2x2", "--video-policy", "all"
        )
        procs.start(
            "transformer",
            "compose",
            "--in",
            procs.endpoint("source"),
            "--video",
            "compose:2x2:640x480:video0,video1,video2,video3",
            "--video-policy",
            "all",
        )
        procs.start(
            "source",
            "source",
            "--frames",
            "20",
            "--video-streams",
            "4",
            "--width",
            "320",
            "--height",
            "240",
            "--audio-streams",
            "0",
            "--video-policy",
            "all",
        )
        frames = [m for m in out.until_end() if isinstance(m, VideoFrame)]
        assert set(procs.wait_all().values()) == {0}
    by_tile: dict[str, list[VideoFrame]] = {}
    for f in frames:
        by_tile.setdefault(f.header.stream_id, []).append(f)
    assert sorted(by_tile) == [f"composite/tile{i}" for i in range(4)]
    for i in range(4):
        expected_pattern = PatternGenerator(320, 240, i)
        # Tiles of late streams can be black in the first composites; later ones must match the source.
        matched = 0
        for f in by_tile[f"composite/tile{i}"]:
            y, _, v = i420_planes(f.data, f.width, f.height)
            counter = read_counter(y)
            if counter is None or (y == 16).all():  # an empty (black) slot reads as counter 0
                continue
            _, _, ev = i420_planes(expected_pattern.frame(counter), 320, 240)
            assert abs(float(v.mean()) - float(ev.mean())) < 2.0, "tile shows another stream's colours"
            matched += 1
        assert matched >= 15, f"tile{i}: only {matched} readable tiles"


def test_mix_and_resample_keep_tones(tmp_path: Path) -> None:
    with stage_procs(tmp_path) as procs:
        out = Collector(procs.endpoint("mixer"))
        procs.start(
            "transformer",
            "mixer",
            "--in",
            procs.endpoint("source"),
            "--audio",
            "resample:16000",
            "--audio",
            "mix",
            "--video-policy",
            "all",
        )
        procs.start(
            "source",
            "source",
            "--frames",
            "30",
            "--video-streams",
            "0",
            "--audio-streams",
            "2",
            "--tone-hz",
            "500",
            "--tone-hz",
            "1300",
            "--video-policy",
            "all",
            "--as-fast-as-possible",
        )
        chunks = [m for m in out.until_end() if isinstance(m, AudioFrame)]
        assert set(procs.wait_all().values()) == {0}
    assert {c.header.stream_id for c in chunks} == {"mix"}
    assert all(c.sample_rate == 16000 and c.channels == 1 for c in chunks)
    samples = np.concatenate([np.frombuffer(c.data, np.int16) for c in chunks])
    assert abs(samples.size - 16000) <= 320 * 2
    spectrum = np.abs(np.fft.rfft(samples[2000 : 18000 if samples.size > 18000 else None].astype(float)))
    freqs = np.fft.rfftfreq(min(16000, samples.size - 2000), 1 / 16000)
    # Each tone's strongest bin sits on it, and both tower over everything else (the two top bins alone can both
    # be one tone's, as its energy spreads over neighbouring bins).
    near = [np.abs(freqs - hz) < 50 for hz in (500, 1300)]
    peaks = [float(freqs[band][np.argmax(spectrum[band])]) for band in near]
    assert abs(peaks[0] - 500) < 5 and abs(peaks[1] - 1300) < 5, peaks
    assert min(spectrum[band].max() for band in near) > 20 * spectrum[~(near[0] | near[1])].max()
    pts = [c.header.pts for c in chunks]
    assert pts == sorted(pts) and pts[1] - pts[0] == 320


def test_bad_input_is_counted_and_the_stage_keeps_running(tmp_path: Path) -> None:
    with stage_procs(tmp_path) as procs:
        feeder = Feeder(procs.endpoint("upstream"))
        out = Collector(procs.endpoint("crop"))
        stats = StatsWatcher(f"ipc://{tmp_path}/crop.stats")
        procs.start(
            "transformer",
            "crop",
            "--in",
            procs.endpoint("upstream"),
            "--video",
            "crop:0,0,64,64",
            "--video-policy",
            "all",
        )
        # A first statistics message proves the subscription is up: the error reports sent later are not lost.
        stats.latest_stats(timeout_s=STAGE_START_TIMEOUT_S)
        good = protocol.encode(_expected(1, 0, 128, 96))
        feeder.send_raw([b"garbage"])  # one part only
        feeder.send_raw([b"SB\x07\x01", b""])  # unknown version
        feeder.send_raw([bytes(good[0]), bytes(100)])  # payload does not match 128x96
        feeder.send_raw([b"SB\x01\x11", b"{not json"])
        feeder.send(_expected(2, 0, 32, 32))  # valid, but smaller than the crop rectangle
        feeder.send_raw([bytes(good[0]), bytes(good[1])])
        frame = out.receive(timeout_s=10)
        assert isinstance(frame, VideoFrame) and (frame.width, frame.height) == (64, 64)
        y, _, _ = i420_planes(frame.data, 64, 64)
        assert np.array_equal(y, i420_planes(_expected(1, 0, 128, 96).data, 128, 96)[0][:64, :64])
        figures = stats.latest_stats(
            lambda f: f["drops"].get("malformed", 0) >= 4 and f["drops"].get("process_error", 0) >= 1)
        assert figures["drops"]["malformed"] == 4
        assert figures["drops"]["process_error"] == 1
        assert figures["errors"]["malformed_message"] == 4 and figures["errors"]["process_failed"] == 1
        # Each error was also reported on its own, before the statistics that counted it, and says what was wrong.
        failed = [e for e in stats.errors if e.code == "process_failed"]
        assert len(failed) == 1 and "exceeds" in failed[0].message, stats.errors
        assert procs.procs["crop"].poll() is None, "stage died on bad input"
        feeder.send(protocol.EndOfStream(""))
        assert out.until_end() == []
        assert procs.wait_all() == {"crop": 0}
        for closable in (feeder, out, stats):
            closable.close()


@pytest.mark.parametrize("video_codec, audio_codec", [("vp8", "opus"), ("h264", "g722"), ("h264", "pcma")])
def test_five_stage_codec_chain_end_of_stream_and_content(tmp_path: Path, video_codec: str, audio_codec: str) -> None:
    """source -> encoder -> decoder -> transformer -> sink: every process exits 0, counters survive the
    codec in order, and the tone keeps its frequency through the audio codec and a resample."""
    report = tmp_path / "report.json"
    with stage_procs(tmp_path) as procs:
        procs.start(
            "sink", "sink", "--in", procs.endpoint("transformer"), "--report", str(report), "--video-policy", "all"
        )
        procs.start(
            "transformer",
            "transformer",
            "--in",
            procs.endpoint("decoder"),
            "--video",
            "resize:320x240",
            "--audio",
            "resample:16000",
            "--video-policy",
            "all",
        )
        procs.start("decoder", "decoder", "--in", procs.endpoint("encoder"), "--video-policy", "all")
        procs.start(
            "encoder",
            "encoder",
            "--in",
            procs.endpoint("source"),
            "--video-codec",
            video_codec,
            "--audio-codec",
            audio_codec,
            "--video-policy",
            "all",
        )
        procs.start(
            "source",
            "source",
            "--frames",
            "60",
            "--width",
            "640",
            "--height",
            "480",
            "--tone-hz",
            "1000",
            "--video-policy",
            "all",
            "--as-fast-as-possible",
        )
        codes = procs.wait_all(60)
    assert set(codes.values()) == {0}, codes
    summary = json.loads(report.read_text())
    video = summary["video"]["video0"]
    assert video["size"] == [320, 240]
    assert video["frames"] == 60 and video["unreadable"] == 0
    assert (video["first_counter"], video["last_counter"]) == (0, 59)
    assert video["missing"] == video["out_of_order"] == 0
    audio = summary["audio"]["audio0"]
    assert audio["sample_rate"] == 16000
    assert abs(audio["frequency_hz"] - 1000.0) < 3.0, audio
    assert audio["level_dbfs"] > -20, audio


SPEAKER_SIZE = (160, 120)


def test_active_speaker_stage_shows_who_talks(tmp_path: Path) -> None:
    """compose:speaker in a stage process: audio passes through untouched; of the two cameras only the talker's
    picture comes out, under the composite's id. (How the speaker changes over time is checked with a driven clock in
    tests/test_compose.py.)"""
    width, height = SPEAKER_SIZE
    patterns = {"alice": PatternGenerator(width, height, 0), "bob": PatternGenerator(width, height, 1)}
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(960) / 48000)).astype(np.int16).tobytes()
    silence = bytes(960 * 2)
    frames = 20
    with stage_procs(tmp_path) as procs:
        feeder = Feeder(procs.endpoint("room"))
        out = Collector(procs.endpoint("speaker"))
        procs.start("transformer", "speaker", "--in", procs.endpoint("room"), "--video",
                    f"compose:speaker:{width}x{height}", "--compose-id", "room-video", "--video-policy", "all")
        for tick in range(frames):
            for person in patterns:  # alice talks, bob is silent; then each sends a picture
                header = MediaHeader(f"{person}/audio", tick, tick * 960, Fraction(1, 48000), 1)
                feeder.send(AudioFrame(header, 48000, 1, 960, tone if person == "alice" else silence))
            for person in patterns:
                vheader = MediaHeader(f"{person}/video", tick, tick * 1800, Fraction(1, 90000), 1)
                feeder.send(VideoFrame(vheader, width, height, patterns[person].frame(tick)))
        feeder.send(protocol.EndOfStream(""))
        messages = out.until_end()
        assert procs.wait_all() == {"speaker": 0}
        feeder.close()
    videos = [m for m in messages if isinstance(m, VideoFrame)]
    assert {v.header.stream_id for v in videos} == {"room-video"}
    assert len([m for m in messages if isinstance(m, AudioFrame)]) == 2 * frames
    assert len(videos) == frames  # one picture per tick: alice's; bob's are consumed
    for video in videos:
        y, _, v = i420_planes(video.data, width, height)
        counter = read_counter(y)
        assert counter is not None
        expected = i420_planes(patterns["alice"].frame(counter), width, height)[2]
        assert np.array_equal(v, expected), "the picture is not alice's"


GRID_PEOPLE = {"alice": 15, "bob": 10, "carol": 6}  # frames per second, as in the bridge's end-to-end test
STALLS = 5
STALL_S = 0.3
RECOVERY_S = 2.0  # every participant's counter moves on in the composite within this long after a stall
GRID_JOIN_TIMEOUT_S = 30.0


class CompositeReader:
    """Reads a grid stage's composites on a thread: (arrival, {person: counter}) of each, from its 2x2 cells."""

    def __init__(self, collector: Collector, people: list[str]) -> None:
        self.collector, self.people = collector, people
        self.seen: list[tuple[float, dict[str, int]]] = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from tests.gridfeeder import COUNTER_PER_PERSON

        while not self.stop:
            msg = self.collector.receive(timeout_s=0.2)
            if not isinstance(msg, VideoFrame):
                continue
            y, _, _ = i420_planes(msg.data, msg.width, msg.height)
            h, w = y.shape
            shown: dict[str, int] = {}
            for r in range(2):
                for c in range(2):
                    counter = read_counter(y[r * h // 2 : (r + 1) * h // 2, c * w // 2 : (c + 1) * w // 2])
                    index = (counter or 0) // COUNTER_PER_PERSON
                    if 1 <= index <= len(self.people):
                        shown[self.people[index - 1]] = counter or 0
            self.seen.append((time.monotonic(), shown))

    def newest(self, since: float = 0.0) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, shown in list(self.seen):
            if t >= since:
                for who, counter in shown.items():
                    out[who] = max(out.get(who, 0), counter)
        return out

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)


def test_grid_shows_everyone_through_upstream_stalls(tmp_path: Path) -> None:
    """Issue 9: nobody vanishes from the grid while their media flows. Three participants (15, 10 and 6 fps) are
    composed by a transformer process; the process feeding it is stopped (SIGSTOP) for 300 ms five times, then
    sends its backlog at once. After each stall, every participant's counter moves on in the composite within
    2 s."""
    people = list(GRID_PEOPLE)
    with stage_procs(tmp_path) as procs:
        out = Collector(procs.endpoint("grid"))
        reader = CompositeReader(out, people)
        procs.start("transformer", "grid", "--in", procs.endpoint("room"), "--video", "compose:grid:640x480:4",
                    "--compose-id", "room-video")
        feeder = subprocess.Popen(
            [sys.executable, "-m", "tests.gridfeeder", procs.endpoint("room"),
             *(f"{p}:{fps}" for p, fps in GRID_PEOPLE.items())],
            cwd=Path(__file__).resolve().parents[1])
        try:
            deadline = time.monotonic() + GRID_JOIN_TIMEOUT_S
            while set(reader.newest()) != set(people):
                assert time.monotonic() < deadline, f"not everyone in the grid: {reader.newest()}"
                time.sleep(0.05)
            for stall in range(STALLS):
                before = reader.newest()
                feeder.send_signal(signal.SIGSTOP)
                time.sleep(STALL_S)
                feeder.send_signal(signal.SIGCONT)
                resumed = time.monotonic()
                while True:
                    after = reader.newest(since=resumed)
                    late = [p for p in people if after.get(p, 0) <= before[p]]
                    if not late:
                        break
                    assert time.monotonic() < resumed + RECOVERY_S, (
                        f"stall {stall + 1}: {late} did not move on in the grid within {RECOVERY_S} s "
                        f"(before {before}, since {after})\n{procs.log('grid')[-2000:]}")
                    time.sleep(0.02)
                time.sleep(0.5)
        finally:
            feeder.send_signal(signal.SIGCONT)
            feeder.terminate()
            feeder.wait(10)
            reader.close()
        assert procs.wait_all() == {"grid": 0}
        out.close()


SLATE_SIZE = (320, 240)
SLATE_FPS = 10


def test_empty_room_grid_sends_a_slate_and_silence(tmp_path: Path) -> None:
    """A transformer with the bridge's room-side transforms and nobody in the room still sends media: the slate
    (waiting for participants, the room's name) at the grid's rate and 20 ms chunks of silence with continuous
    pts; a participant who comes is shown full frame; when their stream ends, the slate is back."""
    from tests.test_compose import is_slate

    width, height = SLATE_SIZE
    pattern = PatternGenerator(width, height, 3)
    with stage_procs(tmp_path) as procs:
        feeder = Feeder(procs.endpoint("room"))
        out = Collector(procs.endpoint("grid"))
        procs.start("transformer", "grid", "--in", procs.endpoint("room"), "--video",
                    f"compose:grid:{width}x{height}:4", "--audio", "mix:8000", "--slate-title", "Room 42",
                    "--grid-fps", str(SLATE_FPS), "--compose-id", "room-video", "--mix-id", "room-audio")

        def until(predicate: object, what: str, timeout_s: float = 20.0) -> list[protocol.Message]:
            got: list[protocol.Message] = []
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                msg = out.receive(timeout_s=0.5)
                if msg is not None:
                    got.append(msg)
                    if predicate(got):  # type: ignore[operator]
                        return got
            raise AssertionError(f"{what}: not within {timeout_s} s ({len(got)} messages)")

        def slates(got: list[protocol.Message]) -> list[VideoFrame]:
            return [m for m in got if isinstance(m, VideoFrame) and is_slate(m, "Room 42")]

        empty = until(lambda got: len(slates(got)) >= 10, "slates while the room is empty")
        videos = [m for m in empty if isinstance(m, VideoFrame)]
        assert videos == slates(empty) and {v.header.stream_id for v in videos} == {"room-video"}
        pts = [v.header.pts for v in videos]
        assert pts == sorted(pts) and len(set(pts)) == len(pts)
        silence = [m for m in empty if isinstance(m, AudioFrame)]
        assert len(silence) >= 10 and {a.header.stream_id for a in silence} == {"room-audio"}
        assert all(a.sample_rate == 8000 and a.samples == 160 for a in silence)
        assert not any(np.frombuffer(a.data, np.int16).any() for a in silence)
        assert [a.header.pts for a in silence] == [silence[0].header.pts + 160 * i for i in range(len(silence))]
        # Paced on the grid's clock: never faster than its rate (a loaded machine may make them later, not sooner).
        assert all(b - a >= 90000 // SLATE_FPS - 1 for a, b in itertools.pairwise(pts)), pts

        index = 0

        def send_alice(frames: int) -> None:
            nonlocal index
            for _ in range(frames):
                index += 1
                header = MediaHeader("alice/video", index, index * 6000, Fraction(1, 90000), time.time_ns())
                feeder.send(VideoFrame(header, width, height, pattern.frame(index)))
                time.sleep(1 / 15)

        send_alice(15)

        def someone_full_frame(got: list[protocol.Message]) -> bool:
            return any(isinstance(m, VideoFrame) and (c := read_counter(i420_planes(m.data, width, height)[0]))
                       and c > 0 for m in got)

        until(someone_full_frame, "alice shown full frame")
        feeder.send(protocol.EndOfStream("alice/video"))
        until(lambda got: len(slates(got)) >= 3, "the slate again once alice's stream ended")
        # A track-ended event frees the tile too, end of stream or not.
        bob = PatternGenerator(width, height, 4)
        for n in range(1, 16):
            header = MediaHeader("bob/video", n, n * 6000, Fraction(1, 90000), time.time_ns())
            feeder.send(VideoFrame(header, width, height, bob.frame(n)))
            time.sleep(1 / 15)
        until(someone_full_frame, "bob shown full frame")
        feeder.send(protocol.Event(protocol.EventType.TRACK_ENDED, "bob/video", {"reason": "ended"}))
        until(lambda got: len(slates(got)) >= 3, "the slate again once bob's track ended")
        feeder.send(protocol.EndOfStream(""))
        out.until_end()
        assert procs.wait_all() == {"grid": 0}
        feeder.close()

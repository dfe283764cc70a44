"""The pipeline's media goes into the room as the bot's camera and microphone."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
import zmq

import protocol
from protocol import EventType
from sipbridge.status import StatusCollector
from stages import codecs
from stages.encoder import EncoderSettings, video_context
from stages.pattern import PatternGenerator, tone
from tests.roomfix import Collector, Room, in_order, room_fixture, wait_until  # noqa: F401  (pytest fixture)
from tests.sipfix import janus_fixture, netns_fixture  # noqa: F401  (pytest fixtures)

pytestmark = [pytest.mark.media, pytest.mark.timeout(90)]

ROOM_ID = 4201
WIDTH, HEIGHT, FPS = 320, 240, 15
SAMPLE_RATE = 48000
AUDIO_FRAME_SAMPLES = 960  # 20 ms
INJECTED_TONE_HZ = 1000.0
TONE_TOLERANCE_HZ = 15.0
MIN_FRAMES = 30
MEDIA_TIMEOUT_S = 40.0
SECOND_STREAM_OFFSET = 20000


class Pusher:
    """A test-side pipeline upstream of the bot: the lead's pattern and a tone, paced in real time."""

    def __init__(self, endpoint: str, video_streams: int = 1, encoded: bool = False) -> None:
        self.video_streams = video_streams
        # encoded: H.264 packets of the pattern (a keyframe a second: nothing here answers keyframe requests).
        self.encoder = video_context(EncoderSettings(fps=FPS, keyframe_interval_s=1.0), WIDTH, HEIGHT) if encoded \
            else None
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 16)
        self.sock.bind(endpoint)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pattern = PatternGenerator(WIDTH, HEIGHT)
        start = time.monotonic()
        frame_index = audio_index = 0
        while not self.stop.is_set():
            now = time.monotonic() - start
            if frame_index / FPS <= now:
                for stream in range(self.video_streams):
                    counter = frame_index + stream * SECOND_STREAM_OFFSET
                    header = protocol.MediaHeader(f"pipeline/video{stream}", frame_index, frame_index,
                                                  Fraction(1, FPS), time.time_ns())
                    msg: protocol.Message = protocol.VideoFrame(header, WIDTH, HEIGHT, pattern.frame(counter))
                    if self.encoder is None:
                        self._send(msg)
                        continue
                    picture = codecs.i420_to_av(msg)
                    picture.pts = frame_index
                    for packet in self.encoder.encode(picture):
                        self._send(protocol.EncodedPacket(header, protocol.Codec.H264, packet.is_keyframe,
                                                          bytes(packet)))
                frame_index += 1
            if audio_index * AUDIO_FRAME_SAMPLES / SAMPLE_RATE <= now:
                first = audio_index * AUDIO_FRAME_SAMPLES
                header = protocol.MediaHeader("pipeline/audio", audio_index, first, Fraction(1, SAMPLE_RATE),
                                              time.time_ns())
                samples = tone(INJECTED_TONE_HZ, SAMPLE_RATE, first, AUDIO_FRAME_SAMPLES)
                self._send(protocol.AudioFrame(header, SAMPLE_RATE, 1, AUDIO_FRAME_SAMPLES, samples.tobytes()))
                audio_index += 1
            time.sleep(0.002)

    def _send(self, msg: protocol.Message) -> None:
        # Until the bot connects, real-time media is simply lost.
        with contextlib.suppress(zmq.Again):
            self.sock.send_multipart(protocol.encode(msg), flags=zmq.NOBLOCK)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close(linger=0)
        self.ctx.term()


def test_pipeline_media_reaches_a_participant(room: Room, tmp_path: Path) -> None:
    inject = f"ipc://{tmp_path}/inject.sock"
    pusher = Pusher(inject)
    try:
        _, probe = room.participants(ROOM_ID, [("alice", 440.0)], probe=True)
        room.bot(ROOM_ID, f"ipc://{tmp_path}/bot.sock", inputs=(inject,))

        def from_bot() -> list[dict]:
            return probe.matching(lambda r: r.get("event") == "received" and r.get("from") == "bot")

        def enough() -> bool:
            records = from_bot()
            frames = sum(len(r["counters"]) for r in records)
            return frames >= MIN_FRAMES and records[-1].get("tone_hz") is not None

        wait_until(enough, MEDIA_TIMEOUT_S, "alice receiving the bot's injected video and audio")
        records = from_bot()
        counters = [c for r in records for c in r["counters"]]
        # Injected frames start at 0 and count up; alice reads them from the pixels she receives.
        assert all(b > a for a, b in itertools.pairwise(counters)), counters
        assert records[-1]["width"] == WIDTH and records[-1]["height"] == HEIGHT
        assert abs(records[-1]["tone_hz"] - INJECTED_TONE_HZ) < TONE_TOLERANCE_HZ, records[-1]
    finally:
        pusher.close()


def test_two_pipeline_video_streams_become_two_cameras(room: Room, tmp_path: Path) -> None:
    inject = f"ipc://{tmp_path}/inject.sock"
    pusher = Pusher(inject, video_streams=2)
    try:
        _, probe = room.participants(ROOM_ID + 1, [("alice", 440.0)], probe=True)
        room.bot(ROOM_ID + 1, f"ipc://{tmp_path}/bot.sock", inputs=(inject,), extra=("--video-tracks", "2"))

        def counters(source: str) -> list[int]:
            return [c for r in probe.matching(lambda r: r.get("event") == "received" and r.get("from") == source)
                    for c in r["counters"]]

        wait_until(lambda: len(counters("bot")) >= MIN_FRAMES and len(counters("bot#2")) >= MIN_FRAMES,
                   MEDIA_TIMEOUT_S, "alice receiving both of the bot's cameras")
        first, second = counters("bot"), counters("bot#2")
        # The second stream's counters start at SECOND_STREAM_OFFSET: each camera carries its own stream.
        ranges = sorted([(min(first), max(first)), (min(second), max(second))])
        assert ranges[0][1] < SECOND_STREAM_OFFSET <= ranges[1][0], ranges
        assert in_order(first) and in_order(second)
    finally:
        pusher.close()


def test_passthrough_into_a_room_that_takes_another_codec_decodes_in_the_page(room: Room, tmp_path: Path) -> None:
    """``--passthrough`` (``[media.to_room] passthrough``) where the bot's camera goes to the room as VP8 and the
    pipeline sends H.264: nothing can be sent as it came, so the page decodes it as without passthrough; alice reads
    the injected counters from the bot's video, at the pipeline's size. (Where the room takes H.264 the frames go as
    they came: tests/test_cheap_room.py::test_bridged_call_passes_h264_through.)"""
    inject = f"ipc://{tmp_path}/inject.sock"
    pusher = Pusher(inject, encoded=True)
    try:
        _, probe = room.participants(ROOM_ID + 3, [("alice", 440.0)], probe=True, codec="vp8")
        room.bot(ROOM_ID + 3, f"ipc://{tmp_path}/bot.sock", inputs=(inject,), codec="vp8", extra=("--passthrough",))

        def from_bot() -> list[dict]:
            return probe.matching(lambda r: r.get("event") == "received" and r.get("from") == "bot")

        wait_until(lambda: sum(len(r["counters"]) for r in from_bot()) >= MIN_FRAMES, MEDIA_TIMEOUT_S,
                   "alice receiving the bot's camera decoded from H.264")
        records = from_bot()
        assert in_order([c for r in records for c in r["counters"]])
        assert (records[-1]["width"], records[-1]["height"]) == (WIDTH, HEIGHT)  # not the 16x16 placeholder
        collector = StatusCollector(room.run_dir)

        def reported() -> dict | None:
            collector.poll(1.0)
            figures = collector.figures.get("browser-raw", {})
            return figures if figures.get("room_send_codecs") else None

        try:
            figures = wait_until(reported, MEDIA_TIMEOUT_S / 2, "the page saying which codec the room takes")
        finally:
            collector.close()
        # The page saw the room take VP8 and never passed the H.264 on; it decoded every packet it was given.
        assert figures["room_send_codecs"] == {"0": "video/vp8"} and figures["inject_passed_frames"] == 0, figures
        assert figures["passing"] in ({}, {"0": False}), figures
    finally:
        pusher.close()


# Once joined, the app puts a black 160x120 canvas on the sender that carried the bot's camera (as a screen share
# would), five seconds in, when the SIP side's frames already pass.
REPLACE_CAMERA_JS = """async () => {
  await new Promise((r) => setTimeout(r, 5000));
  const canvas = document.createElement("canvas");
  canvas.width = 160; canvas.height = 120;
  const g = canvas.getContext("2d");
  setInterval(() => { g.fillStyle = "#000"; g.fillRect(0, 0, 160, 120); }, 50);
  const track = canvas.captureStream(15).getVideoTracks()[0];
  for (const pc of window.__sipbridgeHook.pcs)
    for (const s of pc.getSenders()) if (s.track && s.track.kind === "video") await s.replaceTrack(track);
}"""


def test_passthrough_leaves_a_sender_the_app_gave_another_track(room: Room, tmp_path: Path) -> None:
    """``--passthrough``: the SIP side's frames go only on senders of the bot's camera. When the app replaces the
    camera on its sender by another track, alice receives that track (160x120, black: counter 0), not the SIP side's
    320x240 counters the sender carried before."""
    inject = f"ipc://{tmp_path}/inject.sock"
    pusher = Pusher(inject, encoded=True)
    recipe = tmp_path / "replaces.toml"
    recipe.write_text(f'url = "{room.url}?room={ROOM_ID + 4}&codec=h264"\n'
                      'participant_attribute = "data-participant"\n'
                      'joined_selector = "#status[data-state=\'joined\']"\n'
                      'steps = [{ fill = "#display-name", value = "bot" }, { click = "#join-button" },\n'
                      '  { wait_for = "#status[data-state=\'joined\']", timeout_s = 20 },\n'
                      # Recipe strings are format strings: the script's braces doubled.
                      f'  {{ evaluate = {json.dumps(REPLACE_CAMERA_JS.replace("{", "{{").replace("}", "}}"))} }}]\n')
    try:
        _, probe = room.participants(ROOM_ID + 4, [("alice", 440.0)], probe=True)
        room.bot(ROOM_ID + 4, f"ipc://{tmp_path}/bot.sock", inputs=(inject,), extra=("--passthrough", "--recipe",
                                                                                     str(recipe)))

        def from_bot() -> list[dict]:
            return probe.matching(lambda r: r.get("event") == "received" and r.get("from") == "bot")

        wait_until(lambda: len([r for r in from_bot() if r["width"] == 160]) >= 4, MEDIA_TIMEOUT_S,
                   "alice receiving the track the app put on the camera's sender")
        records = from_bot()
        before = [c for r in records if r["width"] == WIDTH for c in r["counters"]]
        # A record holds a second of frames and the last one's size: the first at 160 wide may hold both tracks.
        after = records[records.index(next(r for r in records if r["width"] == 160)) + 1:]
        assert len([c for c in before if c]) >= 5, records  # the camera went out before, counters and all
        assert all(r["width"] == 160 for r in after), [(r["width"], r["counters"][:3]) for r in after]
        assert sum(len(r["counters"]) for r in after) >= 20, after
        assert not any(c for r in after for c in r["counters"]), [r["counters"] for r in after]
    finally:
        pusher.close()


def test_app_in_a_cross_origin_iframe(room: Room, tmp_path: Path) -> None:
    """Embedded call UIs run in a cross-origin iframe: the hook works there too, both directions."""
    inject = f"ipc://{tmp_path}/inject.sock"
    pusher = Pusher(inject)
    recipe = tmp_path / "embedded.toml"
    recipe.write_text(f'url = "{room.url}frame.html?room={ROOM_ID + 2}&name=bot&autojoin=1"\n'
                      'steps = [{ wait_s = 1 }]\n')
    out = f"ipc://{tmp_path}/bot.sock"
    collector = Collector(out)
    try:
        _, probe = room.participants(ROOM_ID + 2, [("alice", 440.0)], probe=True)
        room.bot(ROOM_ID + 2, out, inputs=(inject,), extra=("--recipe", str(recipe)))

        def from_bot() -> list[int]:
            return [c for r in probe.matching(lambda r: r.get("event") == "received" and r.get("from") == "bot")
                    for c in r["counters"]]

        wait_until(lambda: len(from_bot()) >= MIN_FRAMES and len(collector.counters("alice/video")) >= MIN_FRAMES,
                   MEDIA_TIMEOUT_S, "media both ways through the iframe")
        assert in_order(from_bot()) and in_order(collector.counters("alice/video"))
        added = [e for e in collector.events_of(EventType.TRACK_ADDED) if e.stream_id == "alice/video"]
        assert added[0].attributes["identified_by"] == "attribute"  # found alice's tile inside the iframe
    finally:
        collector.close()
        pusher.close()

"""Decoder and encoder as real processes on ipc:// endpoints, fed and drained by the test over ZeroMQ."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import zmq

import protocol
from protocol import (
    AudioFrame,
    Codec,
    EncodedPacket,
    EndOfStream,
    ErrorReport,
    KeyframeRequest,
    MediaHeader,
    Message,
    Stats,
    VideoFrame,
)
from stages import codecs
from stages.base import control_endpoint
from tests.test_codecs import (
    FRAME_STEP_90K,
    HEIGHT_PX,
    INPUT_RATE_HZ,
    TONE_AMPLITUDE,
    TONE_HZ,
    WIDTH_PX,
    pattern,
    peak_hz_and_rms,
    tone,
    video_frame,
)

pytestmark = pytest.mark.timeout(60)

RECEIVE_TIMEOUT_MS = 10_000
STARTUP_RECEIVE_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 10.0
STATS_WAIT_S = 5.0
# A test's own send waits for room this long: ten stage processes starting on a loaded machine connect late.
SEND_TIMEOUT_S = 60.0
PROJECT_DIR = Path(__file__).resolve().parents[1]
PROGRAM = "from sipbridge.cli import main; main()"


@dataclass
class StageProcess:
    """One `sipbridge stage NAME` process with its output and statistics endpoints."""

    name: str
    proc: subprocess.Popen[bytes]
    output: str
    stats: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.name} did not exit:\n{self.log()}") from None


@dataclass
class Harness:
    tmp: Path
    ctx: zmq.Context[Any] = field(default_factory=zmq.Context)
    procs: list[StageProcess] = field(default_factory=list)
    sockets: list[zmq.Socket[Any]] = field(default_factory=list)

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.tmp}/{name}"

    def start(self, kind: str, name: str, inputs: list[str], *extra: str, live: bool = False) -> StageProcess:
        output, stats = self.endpoint(f"{name}.sock"), self.endpoint(f"{name}.stats")
        args = [sys.executable, "-c", PROGRAM, "stage", kind, "--name", name, "--out", output, "--stats", stats,
                "--video-policy", "all"]
        for endpoint in inputs:
            args += ["--in", endpoint]
        log_path = self.tmp / f"{name}.log"
        # PYTHONPATH: plugin transforms defined in this module load in the stage process.
        env = {**os.environ, "SIPBRIDGE_RUN_DIR": str(self.tmp), "SIPBRIDGE_LIVE": "1" if live else "0",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH")]))}
        with open(log_path, "a+b") as log:
            proc = subprocess.Popen([*args, *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
        stage = StageProcess(name, proc, output, stats, log_path)
        self.procs.append(stage)
        return stage

    def socket(self, kind: int, endpoint: str, bind: bool) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, RECEIVE_TIMEOUT_MS)
        sock.setsockopt(zmq.SNDTIMEO, RECEIVE_TIMEOUT_MS)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        (sock.bind if bind else sock.connect)(endpoint)
        self.sockets.append(sock)
        return sock

    def feed(self, name: str) -> tuple[zmq.Socket[Any], zmq.Socket[Any], str]:
        """A PUSH the stages connect to as their input, and the PULL their keyframe requests arrive on."""
        endpoint = self.endpoint(f"{name}.sock")
        return self.socket(zmq.PUSH, endpoint, True), self.socket(zmq.PULL, control_endpoint(endpoint), True), endpoint

    def close(self) -> None:
        for stage in self.procs:
            if stage.proc.poll() is None:
                stage.proc.kill()
                stage.proc.wait()
        for sock in self.sockets:
            sock.close()
        self.ctx.term()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def send(sock: zmq.Socket[Any], msg: Message, timeout_s: float = SEND_TIMEOUT_S) -> None:
    """Send as soon as there is room (the stage may not have connected yet), failing only after a deadline."""
    parts = protocol.encode(msg)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock.send_multipart(parts, flags=zmq.NOBLOCK)
            return
        except zmq.Again:
            if time.monotonic() > deadline:
                raise AssertionError(f"no room to send {type(msg).__name__} within {timeout_s:.0f} s") from None
            sock.poll(100, zmq.POLLOUT)


def receive(sock: zmq.Socket[Any]) -> Message:
    return protocol.decode(sock.recv_multipart())


def receive_all_until_eos(socks: dict[str, zmq.Socket[Any]], timeout_s: float) -> dict[str, list[Message]]:
    """Read several outputs at once until each has ended: a producer whose consumer lags behind its end of stream
    for long gives up waiting and exits, and ZeroMQ then drops what was still queued for the consumer."""
    poller = zmq.Poller()
    for sock in socks.values():
        poller.register(sock, zmq.POLLIN)
    received: dict[str, list[Message]] = {label: [] for label in socks}
    pending = dict(socks)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        ready = dict(poller.poll(100))
        for label, sock in list(pending.items()):
            while sock in ready and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                msg = receive(sock)
                if isinstance(msg, EndOfStream) and not msg.stream_id:
                    poller.unregister(sock)
                    sock.close()
                    del pending[label]
                    break
                received[label].append(msg)
    assert not pending, f"no end of stream from {sorted(pending)} within {timeout_s:.0f} s"
    return received


def receive_until_eos(sock: zmq.Socket[Any]) -> list[Message]:
    """Everything up to the final end of stream; then disconnect, which is what lets the producer exit."""
    messages = []
    while not isinstance(msg := receive(sock), EndOfStream) or msg.stream_id:
        messages.append(msg)
    sock.close()
    return messages


def wait_stats(sub: zmq.Socket[Any], predicate: Any, errors: list[ErrorReport] | None = None) -> dict[str, Any]:
    """Read the statistics socket until a Stats message satisfies ``predicate``; collect ErrorReports."""
    deadline = time.monotonic() + STATS_WAIT_S
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        msg = receive(sub)
        if isinstance(msg, ErrorReport) and errors is not None:
            errors.append(msg)
        if isinstance(msg, Stats):
            last = msg.figures
            if predicate(last):
                return last
    raise AssertionError(f"statistics never matched; last: {last}")


def y_error(frame: VideoFrame, index: int) -> float:
    original = np.frombuffer(pattern(index), np.uint8)[: WIDTH_PX * HEIGHT_PX].reshape(HEIGHT_PX, WIDTH_PX)
    return float(np.abs(codecs.y_plane(frame).astype(int) - original).mean())


VIDEO_FRAMES = 30


@pytest.mark.parametrize("codec", ["h264", "vp8"])
def test_video_round_trip_through_processes(harness: Harness, codec: str) -> None:
    push, _, feed = harness.feed("feed")
    encoder = harness.start("encoder", "encoder", [feed], "--video-codec", codec, "--keyframe-interval-s", "100")
    decoder = harness.start("decoder", "decoder", [encoder.output])
    pull = harness.socket(zmq.PULL, decoder.output, False)
    for i in range(VIDEO_FRAMES):
        send(push, video_frame(i))
    send(push, EndOfStream(""))
    frames = receive_until_eos(pull)
    assert all(isinstance(f, VideoFrame) for f in frames)
    video = [f for f in frames if isinstance(f, VideoFrame)]
    assert [f.header.pts for f in video] == [i * FRAME_STEP_90K for i in range(VIDEO_FRAMES)]
    assert [f.header.seq for f in video] == list(range(VIDEO_FRAMES))
    assert [f.header.capture_time_ns for f in video] == [1_000_000 + i for i in range(VIDEO_FRAMES)]
    errors = [y_error(f, i) for i, f in enumerate(video)]
    assert max(errors) < 4.0, errors
    assert encoder.wait_exit() == 0 and decoder.wait_exit() == 0


@pytest.mark.parametrize("codec", ["h264", "vp8"])
def test_keyframe_request_on_control_endpoint_forces_a_keyframe(harness: Harness, codec: str) -> None:
    push, _, feed = harness.feed("feed")
    encoder = harness.start("encoder", "encoder", [feed], "--video-codec", codec, "--keyframe-interval-s", "100")
    pull = harness.socket(zmq.PULL, encoder.output, False)
    control = harness.socket(zmq.PUSH, control_endpoint(encoder.output), False)
    stats = harness.socket(zmq.SUB, encoder.stats, False)
    packets = []
    for i in range(5):
        send(push, video_frame(i))
        packets.append(receive(pull))
    send(control, KeyframeRequest("v", "test"))
    # The control edge and the data edge are separate sockets: wait until the encoder has seen the request.
    wait_stats(stats, lambda f: f["keyframe_requests_in"] >= 1)
    for i in range(5, 8):
        send(push, video_frame(i))
        packets.append(receive(pull))
    assert all(isinstance(p, EncodedPacket) for p in packets)
    flags = [p.keyframe for p in packets if isinstance(p, EncodedPacket)]
    assert flags == [True, False, False, False, False, True, False, False]
    assert codecs.is_keyframe_payload(codecs.codec_from_name(codec), packets[5].data)  # type: ignore[union-attr]
    send(push, EndOfStream(""))
    assert receive_until_eos(pull) == []
    assert encoder.wait_exit() == 0


AUDIO_CODECS = ["opus", "pcmu", "pcma", "g722"]
AUDIO_CHUNK_SAMPLES = 480  # 10 ms at 48 kHz: the encoder re-chunks to 20 ms


@pytest.mark.timeout(120)
def test_audio_tone_round_trips_through_processes(harness: Harness) -> None:
    """A 1 kHz tone through encoder+decoder processes for every audio codec, all four chains at once."""
    chains = {}
    # label -> (codec, the decoder's output rate: 0 = the codec's own)
    # (G.711 to 48 kHz is what the bridge does on the way into the room.)
    variants = {codec: (codec, 0) for codec in AUDIO_CODECS} | {"pcmu@48k": ("pcmu", 48000)}
    for label, (codec, out_rate) in variants.items():
        push, _, feed = harness.feed(f"feed-{label}")
        encoder = harness.start("encoder", f"enc-{label}", [feed], "--audio-codec", codec)
        decoder = harness.start("decoder", f"dec-{label}", [encoder.output], "--audio-rate", str(out_rate))
        chains[label] = (push, encoder, decoder, harness.socket(zmq.PULL, decoder.output, False))
    signal = tone(1.0)
    for i in range(len(signal) // AUDIO_CHUNK_SAMPLES):
        header = MediaHeader("a", i, i * AUDIO_CHUNK_SAMPLES, Fraction(1, INPUT_RATE_HZ), 3_000_000 + i)
        data = signal[i * AUDIO_CHUNK_SAMPLES : (i + 1) * AUDIO_CHUNK_SAMPLES].tobytes()
        for push, *_ in chains.values():
            send(push, AudioFrame(header, INPUT_RATE_HZ, 1, AUDIO_CHUNK_SAMPLES, data))
    for push, *_ in chains.values():
        send(push, EndOfStream(""))
    # Ten stage processes start at once: on a loaded 2-core machine the first frame can take a while.
    outputs = receive_all_until_eos({label: chain[3] for label, chain in chains.items()}, STARTUP_RECEIVE_TIMEOUT_S)
    for label, (_, encoder, decoder, _) in chains.items():
        codec, out_rate = variants[label]
        frames = [f for f in outputs[label] if isinstance(f, AudioFrame)]
        rate = out_rate or codecs.SAMPLE_RATE_HZ[codecs.codec_from_name(codec)]
        assert frames and all(f.sample_rate == rate for f in frames)
        assert [f.header.seq for f in frames] == list(range(len(frames)))
        if out_rate:
            # Resampled audio keeps a gapless timeline at the new rate.
            assert all(f.header.time_base == Fraction(1, rate) for f in frames)
            assert all(b.header.pts == a.header.pts + a.samples for a, b in itertools.pairwise(frames))
        decoded = np.concatenate([np.frombuffer(f.data, np.int16).reshape(-1, f.channels)[:, 0] for f in frames])
        assert len(decoded) >= rate * 0.98
        peak, rms = peak_hz_and_rms(decoded, rate)
        assert abs(peak - TONE_HZ) < 5, label
        assert rms == pytest.approx(TONE_AMPLITUDE / np.sqrt(2), rel=0.1), label
        assert encoder.wait_exit() == 0 and decoder.wait_exit() == 0


def encode_packets(codec: str, count: int) -> list[EncodedPacket]:
    """Real packets made in the test with PyAV, independent of the encoder stage."""
    from stages.encoder import EncoderSettings, video_context

    ctx = video_context(EncoderSettings(video_codec=codecs.codec_from_name(codec), keyframe_interval_s=100.0),
                        WIDTH_PX, HEIGHT_PX)
    out: list[EncodedPacket] = []
    for i in range(count):
        picture = codecs.i420_to_av(video_frame(i))
        picture.pts = i * FRAME_STEP_90K
        for packet in ctx.encode(picture):
            header = MediaHeader(codec, len(out), packet.pts, codecs.VIDEO_TIME_BASE, 4_000_000 + i)
            out.append(EncodedPacket(header, codecs.codec_from_name(codec), packet.is_keyframe, bytes(packet)))
    return out


def with_seq(packet: EncodedPacket, seq: int) -> EncodedPacket:
    h = packet.header
    return EncodedPacket(MediaHeader(h.stream_id, seq, h.pts, h.time_base, h.capture_time_ns), packet.codec,
                         packet.keyframe, packet.data)


def test_decoder_survives_bad_input(harness: Harness) -> None:
    push, upstream_control, feed = harness.feed("feed")
    decoder = harness.start("decoder", "decoder", [feed])
    pull = harness.socket(zmq.PULL, decoder.output, False)
    stats = harness.socket(zmq.SUB, decoder.stats, False)
    h264 = encode_packets("h264", 6)
    vp8 = encode_packets("vp8", 6)
    send(push, h264[0])
    assert isinstance(receive(pull), VideoFrame)
    wait_stats(stats, lambda f: True)  # the subscription is live: no ErrorReport will be missed
    # Garbage as an H.264 packet (in sequence), a truncated VP8 key frame, messages that are not sipbridge's.
    garbage = EncodedPacket(MediaHeader("h264", 1, 1, codecs.VIDEO_TIME_BASE, 0), Codec.H264, False, b"\x13" * 64)
    send(push, garbage)
    send(push, with_seq(EncodedPacket(vp8[0].header, Codec.VP8, True, bytes(vp8[0].data)[:40]), 0))
    push.send_multipart([b"not", b"a", b"message"])
    push.send_multipart([b"SB\x01\x03" + b"\x00" * 10, b"payload"])  # truncated media header
    push.send_multipart([bytes(protocol.encode(h264[1])[0])[:-3], b"\x00\x00\x01"])  # stream id cut short
    errors: list[ErrorReport] = []
    figures = wait_stats(stats, lambda f: f["drops"].get("corrupt", 0) >= 2 and f["drops"].get("malformed", 0) >= 3,
                         errors)
    assert figures["keyframe_requests_out"] >= 2
    assert {e.code for e in errors} >= {"corrupt_packet", "malformed_message"}
    requests = [receive(upstream_control) for _ in range(2)]
    assert {r.stream_id for r in requests if isinstance(r, KeyframeRequest)} == {"h264", "vp8"}
    # Damaged reference chain: H.264 delta frames are dropped until the next keyframe; then decoding resumes.
    send(push, with_seq(h264[2], 2))
    key = encode_packets("h264", 1)[0]
    send(push, with_seq(key, 3))
    send(push, with_seq(vp8[0], 1))
    send(push, with_seq(vp8[1], 2))
    send(push, EndOfStream(""))
    frames = receive_until_eos(pull)
    assert all(isinstance(f, VideoFrame) for f in frames)
    assert [f.header.stream_id for f in frames if isinstance(f, VideoFrame)] == ["h264", "vp8", "vp8"]
    assert decoder.wait_exit() == 0
    assert "ERROR [decoder]" in decoder.log()  # logged, naming the stage (rate-limited, so maybe not each one)


def test_encoder_survives_bad_input(harness: Harness) -> None:
    push, _, feed = harness.feed("feed")
    encoder = harness.start("encoder", "encoder", [feed], "--video-codec", "vp8", "--width", "160", "--height", "120")
    pull = harness.socket(zmq.PULL, encoder.output, False)
    stats = harness.socket(zmq.SUB, encoder.stats, False)
    send(push, video_frame(0))
    first = receive(pull)
    assert isinstance(first, EncodedPacket) and first.keyframe
    wait_stats(stats, lambda f: True)  # the subscription is live: no ErrorReport will be missed
    # A frame whose payload does not match its dimensions, one of another size, garbage parts.
    head = protocol.encode(video_frame(1))[0]
    push.send_multipart([head, pattern(1)[:-7]])
    push.send_multipart([b"\x00" * 3])
    send(push, video_frame(2, width=64, height=48))
    errors: list[ErrorReport] = []
    figures = wait_stats(stats, lambda f: f["drops"].get("malformed", 0) >= 2, errors)
    assert {e.code for e in errors} >= {"malformed_message"}
    assert figures["scaled_frames"] >= 1
    send(push, video_frame(3))
    send(push, EndOfStream(""))
    packets = [p for p in receive_until_eos(pull) if isinstance(p, EncodedPacket)]
    assert len(packets) == 2
    decoder = av.CodecContext.create("vp8", "r")
    pictures = [f for p in [first, *packets] for f in decoder.decode(av.Packet(bytes(p.data)))]
    assert [(f.width, f.height) for f in pictures] == [(160, 120)] * 3
    assert encoder.wait_exit() == 0


class MislabelledAudio:
    """A faulty user transform: stereo audio labelled as 6 channels (what ``resample:8000:6`` once did)."""

    def process(self, msg: Message) -> tuple[Message, ...]:
        if isinstance(msg, AudioFrame):
            return (AudioFrame(msg.header, msg.sample_rate, 6, msg.samples, msg.data),)
        return (msg,)

    def flush(self, stream_id: str) -> tuple[Message, ...]:
        return ()


def receive_media(sock: zmq.Socket[Any], count: int) -> list[Message]:
    """The next ``count`` media messages (control messages in between are skipped)."""
    media: list[Message] = []
    while len(media) < count:
        msg = receive(sock)
        if isinstance(msg, (VideoFrame, AudioFrame, EncodedPacket)):
            media.append(msg)
        else:
            assert not (isinstance(msg, EndOfStream) and not msg.stream_id), "a live stage ended the bridge"
    return media


def media_flows(push: zmq.Socket[Any], out: zmq.Socket[Any], first_seq: int, timeout_s: float = 30.0) -> int:
    """Send frames from ``first_seq`` on until one comes out (a reconnecting edge may lose the first few);
    return the seq of the first one out."""
    deadline = time.monotonic() + timeout_s
    seq = first_seq
    while time.monotonic() < deadline:
        send(push, video_frame(seq))
        seq += 1
        if out.poll(200):
            msg = receive(out)
            assert not (isinstance(msg, EndOfStream) and not msg.stream_id), "a live stage ended the bridge"
            if isinstance(msg, VideoFrame) and msg.header.seq >= first_seq:
                return msg.header.seq
    raise AssertionError(f"no media came out within {timeout_s:.0f} s")


def test_a_message_the_stage_cannot_send_is_a_counted_drop_not_a_crash(harness: Harness) -> None:
    push, _, feed = harness.feed("feed")
    stage = harness.start("transformer", "bad", [feed], "--audio", "plugin:tests.test_codec_stages:MislabelledAudio")
    out = harness.socket(zmq.PULL, stage.output, False)
    stats = harness.socket(zmq.SUB, stage.stats, False)
    for i in range(5):
        header = MediaHeader("mic", i, i * 960, Fraction(1, 48000), 1_000_000 + i)
        send(push, AudioFrame(header, 48000, 2, 960, np.zeros(960 * 2, np.int16).tobytes()))
    send(push, video_frame(0))
    [frame] = receive_media(out, 1)
    assert isinstance(frame, VideoFrame), "media after the bad messages must still flow"
    errors: list[ErrorReport] = []
    figures = wait_stats(stats, lambda f: f["drops"].get("emit_error", 0) >= 5, errors)
    assert figures["errors"].get("emit_failed", 0) >= 5
    assert any(e.code == "emit_failed" and e.stream_id == "mic" for e in errors) or "emit_failed" in stage.log()
    assert stage.proc.poll() is None
    assert "[bad]" in stage.log() and "stream=mic" in stage.log(), "the log line names the stage and the stream"
    send(push, EndOfStream(""))
    receive_until_eos(out)
    assert stage.wait_exit() == 0


def test_a_live_stage_outlives_end_of_stream_and_its_producer_restart(harness: Harness) -> None:
    """End of stream ends streams, never a live bridge: both stages downstream keep running and media flows
    on after an injected EndOfStream(""), and after the first stage is stopped and started again."""
    push, _, feed = harness.feed("feed")
    first = harness.start("transformer", "first", [feed], "--video", "resize:32x24", live=True)
    second = harness.start("transformer", "second", [first.output], "--video", "resize:16x12", live=True)
    out = harness.socket(zmq.PULL, second.output, False)
    for i in range(3):
        send(push, video_frame(i))
    assert [m.header.seq for m in receive_media(out, 3)] == [0, 1, 2]
    send(push, EndOfStream(""))  # one valid message that used to end the whole bridge
    media_flows(push, out, 3)
    assert first.proc.poll() is None and second.proc.poll() is None
    assert "staying up for its restart" in first.log()
    # An intended stop of one stage (SIGTERM): it flushes, ends its streams, and exits 0 at once, as its live
    # consumer hangs up after reading the end of stream; the consumer stays for the restart.
    first.proc.terminate()
    assert first.wait_exit() == 0
    assert "consumer still connected" not in first.log()
    assert second.proc.poll() is None
    while out.poll(200):  # the first stage's flushed tail
        receive(out)
    restarted = harness.start("transformer", "first", [feed], "--video", "resize:32x24", live=True)
    media_flows(push, out, 100)
    assert second.proc.poll() is None and restarted.proc.poll() is None


# How long the failing stage may take to get its first frames to a consumer on a loaded machine.
MEDIA_BEFORE_CRASH_TIMEOUT_S = 30.0


def test_a_stage_that_fails_sends_no_end_of_stream(tmp_path: Path) -> None:
    """A crash is not an end: the consumer must not be told the streams are over (it would flush them and, in a
    finite pipeline, exit); it keeps its state and waits for the restart."""
    import asyncio

    from stages.base import Stage, StageOptions

    ctx = zmq.Context.instance()
    out = ctx.socket(zmq.PULL)
    out.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/failing.sock"
    out.connect(endpoint)
    received: list[object] = []

    class FailingSource(Stage):
        async def produce(self) -> None:
            await self.wait_for_consumers(10.0)
            # Media flows before the crash (the consumer has read some: a connect on a loaded machine can
            # take a while, and the drop policy may shed frames sent before it), then the stage fails.
            deadline = time.monotonic() + MEDIA_BEFORE_CRASH_TIMEOUT_S
            seq = 0
            while not received and time.monotonic() < deadline:
                await self.emit(video_frame(seq))
                seq += 1
                await asyncio.sleep(0.05)
                while out.poll(0):
                    received.append(receive(out))
            raise RuntimeError("a bug in the stage")

    try:
        stage = FailingSource(StageOptions("failing", output=endpoint, stats=f"ipc://{tmp_path}/failing.stats"))
        assert asyncio.run(stage.run()) == 1
        while out.poll(500):
            received.append(receive(out))
    finally:
        out.close()
    # Frames arrived, and nothing after them says the streams are over.
    assert received, "no media reached the consumer before the crash"
    assert {type(m) for m in received} == {VideoFrame}, received


def test_unknown_stream_ids_cannot_grow_a_stage_without_bound(harness: Harness) -> None:
    from stages.base import MAX_TRACKED_STREAMS

    push, _, feed = harness.feed("feed")
    stage = harness.start("transformer", "many", [feed])
    out = harness.socket(zmq.PULL, stage.output, False)
    stats = harness.socket(zmq.SUB, stage.stats, False)
    total = MAX_TRACKED_STREAMS * 20
    for i in range(total):
        header = MediaHeader(f"forged-{i}", 0, 0, Fraction(1, 48000), 1_000_000)
        send(push, AudioFrame(header, 48000, 1, 480, bytes(960)))
    figures = wait_stats(stats, lambda f: f["drops"].get("too_many_streams", 0) == total - MAX_TRACKED_STREAMS)
    assert len(figures["streams"]) == MAX_TRACKED_STREAMS
    assert len(receive_media(out, MAX_TRACKED_STREAMS)) == MAX_TRACKED_STREAMS
    assert stage.proc.poll() is None


def test_an_endpoint_with_a_live_owner_is_refused(harness: Harness) -> None:
    """ZeroMQ would unlink a bound ipc socket and take it over: a second stage on the same endpoint must not."""
    _, _, feed = harness.feed("feed")
    owner = harness.start("transformer", "relay", [feed])
    stats = harness.socket(zmq.SUB, owner.stats, False)
    wait_stats(stats, lambda f: True)  # bound and publishing
    intruder = harness.start("transformer", "relay", [feed])
    assert intruder.proc.wait(EXIT_TIMEOUT_S) == 2
    assert "is in use by a live process" in intruder.log()
    assert owner.proc.poll() is None
    wait_stats(stats, lambda f: f["pid"] == owner.proc.pid)  # the owner still has its sockets


def test_stream_table_is_bounded_and_idle_streams_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import base

    clock = [1000.0]
    monkeypatch.setattr(base.time, "monotonic", lambda: clock[0])
    table = base.StreamTable(limit=3, idle_s=10.0)
    for sid in ("a", "b", "c"):
        table[sid].frames_in += 1
    assert not table.admits("d")
    table["d"].frames_in += 1  # counted on figures that are not kept
    assert "d" not in table and table.refused == 1 and len(table) == 3
    clock[0] += 6
    table["a"].frames_in += 1  # a is live, b and c go idle
    clock[0] += 5
    assert table.admits("d")  # room made by expiring the idle ones
    assert sorted(sid for sid, _ in table.items()) == ["a"] and table.expired == 2
    table["d"].frames_in += 1
    assert table.get("a") is not None and table["a"].frames_in == 2 and "d" in table


def test_the_output_counts_a_consumer_that_connects_at_once(tmp_path: Path) -> None:
    """A consumer accepted before the output's monitor was attached was never counted: at the end the stage found
    "no consumer connected" and skipped the end of stream the consumer was waiting for (ci31, under load). The
    monitor now comes before the bind, so no connection can precede it: this test connects in between."""
    import asyncio

    from stages.base import Stage, StageOptions

    endpoint = f"ipc://{tmp_path}/out.sock"
    peer_ctx = zmq.Context()
    peer = peer_ctx.socket(zmq.PULL)
    peer.setsockopt(zmq.LINGER, 0)
    stage = Stage(StageOptions(name="early", output=endpoint))
    make_socket = stage._socket

    def socket_whose_bind_lets_a_consumer_in(kind: int) -> Any:
        sock = make_socket(kind)
        real_bind = sock.bind

        def bind(addr: str) -> Any:
            result = real_bind(addr)
            if addr == endpoint:
                peer.connect(endpoint)
                time.sleep(0.3)  # ZeroMQ's I/O thread accepts the connection before the stage's next step
            return result

        sock.bind = bind
        return sock

    stage._socket = socket_whose_bind_lets_a_consumer_in  # type: ignore[method-assign]

    async def count_consumers() -> int:
        stage._open_sockets()
        monitor = asyncio.create_task(stage._monitor_consumers())
        deadline = time.monotonic() + 5.0
        while stage._consumers == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        monitor.cancel()
        return stage._consumers

    try:
        assert asyncio.run(count_consumers()) == 1
    finally:
        peer.close()
        peer_ctx.term()
        for sock in [stage._out, stage._out_control, stage._out_monitor]:
            if sock is not None:
                sock.close(0)
        stage._codec_thread.shutdown()
        stage._ctx.term()

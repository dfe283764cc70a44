"""The encoder stage: raw I420 video and s16 audio in, encoded packets out.

Video goes to H.264 (libx264: zerolatency tune, baseline profile, Annex B, no
B-frames) or VP8 (libvpx realtime); audio to Opus, PCMU, PCMA or G.722 in 20 ms
frames. One codec context per stream id, opened on the first frame of the stream
on the stage's codec thread. Frames whose size differs from the configured (or
first seen) size are scaled; audio is resampled to the codec's rate and layout and
re-chunked to the codec's frame size with continuous pts. Encoded packets pass
through. Encoded video in the configured codec (a passthrough bridge forwards the
room's H.264 undecoded) is numbered in this stage's sequence for its stream; while
a stream passes on such frames, keyframe requests for it go upstream (to whoever
made them), and the first picture encoded here after them is a keyframe (the
receiver's references are someone else's).

A keyframe request on the control edge makes the next frame of that stream a
keyframe (``pict_type = I``). Output timestamps are in the codec's clock
(1/90000 for video, 1/sample-rate for audio); capture times follow the content.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import click
import numpy as np
from av.video.frame import PictureType

from protocol import AudioFrame, Codec, EncodedPacket, KeyframeRequest, MediaHeader, Message, VideoFrame
from stages import codecs
from stages.base import Stage, StageOptions
from stages.options import build_options, run, stage_options

DEFAULT_FPS = 30
DEFAULT_BITRATE_KBPS = 1000
DEFAULT_KEYFRAME_INTERVAL_S = 2.0
DEFAULT_PRESET = "veryfast"
# An input timestamp this far from where the audio should continue is a real discontinuity
# (a restart upstream): follow it instead of stretching.
AUDIO_RESYNC_THRESHOLD_S = 0.2
OPUS_BITRATE_BPS = 32_000
MAX_PENDING_TIMESTAMPS = 64


@dataclass
class EncoderSettings:
    video_codec: Codec = Codec.H264
    audio_codec: Codec = Codec.OPUS
    width: int | None = None
    height: int | None = None
    fps: int = DEFAULT_FPS
    bitrate_kbps: int = DEFAULT_BITRATE_KBPS
    keyframe_interval_s: float = DEFAULT_KEYFRAME_INTERVAL_S
    preset: str = DEFAULT_PRESET
    threads: int = 0


def video_context(settings: EncoderSettings, width: int, height: int) -> Any:
    """An opened PyAV encoder for the settings (shared with the chain benchmark)."""
    codec = settings.video_codec
    ctx: Any = av.CodecContext.create(codecs.ENCODER_NAMES[codec], "w")
    ctx.width = width
    ctx.height = height
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = codecs.VIDEO_TIME_BASE
    ctx.framerate = Fraction(settings.fps)
    ctx.bit_rate = settings.bitrate_kbps * 1000
    ctx.gop_size = max(1, round(settings.keyframe_interval_s * settings.fps))
    ctx.max_b_frames = 0
    ctx.thread_count = settings.threads
    if codec is Codec.H264:
        ctx.options = {
            "preset": settings.preset,
            "tune": "zerolatency",
            "profile": "baseline",
            # Make a forced I frame an IDR so a decoder joining there can start.
            "forced-idr": "1",
            # Cap the peaks too: a real-time link cannot absorb 10x keyframe bursts.
            "x264-params": f"vbv-maxrate={settings.bitrate_kbps}:vbv-bufsize={settings.bitrate_kbps}",
        }
    elif codec in (Codec.VP8, Codec.VP9):
        ctx.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "auto-alt-ref": "0"}
    else:
        raise ValueError(f"{codec.name} is not a video codec this encoder makes")
    ctx.open()
    return ctx


@dataclass
class VideoStream:
    context: Any
    width: int
    height: int
    force_keyframe: bool = False
    last_pts: int = -1
    out_seq: int = 0
    pending: dict[int, int] = field(default_factory=dict)  # codec pts -> capture_time_ns


@dataclass
class AudioStream:
    context: Any
    resampler: codecs.PrimedResampler
    fifo: Any
    frame_samples: int
    next_pts: int | None = None  # codec pts of the next sample leaving the fifo
    expected_in_pts_s: float | None = None
    out_seq: int = 0
    first_chunk_pts: int | None = None
    input_format: tuple[int, int] | None = None  # (sample rate, channels) the resampler was set up for
    # Codec delay (Opus and G.722 report packets up to their look-ahead earlier); added back so
    # output timestamps continue the input's clock.
    pts_offset: int | None = None
    # (codec pts of the first sample of an input frame, its capture time), in order.
    captures: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)


class Encoder(Stage):
    media_thread = True  # its media never touches the event loop (stages/base.py)

    def __init__(self, options: StageOptions, settings: EncoderSettings) -> None:
        super().__init__(options)
        self.settings = settings
        self._video: dict[str, VideoStream] = {}
        self._audio: dict[str, AudioStream] = {}
        self.keyframes_out = 0
        self.forced_keyframes = 0
        self.scaled_frames = 0
        self.packets_passed = 0
        self.video_frames_encoded = 0
        # Video streams whose last message was an encoded frame passed on (not one encoded here).
        self._passing: set[str] = set()
        self._pass_seq: dict[str, int] = {}  # next sequence number of a passing stream with no encoder yet
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> int:
        # Keep the loop so codec-thread code can report errors through the loop's sockets.
        self._loop = asyncio.get_running_loop()
        return await super().run()

    # ----- codec thread ---------------------------------------------------------------------
    def process(self, msg: Message) -> Iterable[Message]:
        if isinstance(msg, VideoFrame):
            if "video" in self.refused_kinds:  # the SIP peer refused video: encoding it would be for nothing
                self.drops["refused_by_peer"] += 1
                return ()
            return self._encode_video(msg)
        if isinstance(msg, AudioFrame):
            if "audio" in self.refused_kinds:
                self.drops["refused_by_peer"] += 1
                return ()
            return self._encode_audio(msg)
        if isinstance(msg, EncodedPacket) and msg.codec.is_video:
            return self._pass_video(msg)
        return (msg,)  # encoded audio and the rest pass through

    def _pass_video(self, packet: EncodedPacket) -> tuple[Message, ...]:
        sid = packet.header.stream_id
        if "video" in self.refused_kinds:
            self.drops["refused_by_peer"] += 1
            return ()
        if packet.codec is not self.settings.video_codec:
            return (packet,)  # not ours to judge (the janus stage drops a codec its call did not negotiate)
        self._passing.add(sid)
        self.packets_passed += 1
        # Numbered in this stage's sequence for the stream, shared with the frames encoded here.
        state = self._video.get(sid)
        if state is not None:
            seq, state.out_seq = state.out_seq, state.out_seq + 1
        else:
            seq = self._pass_seq.get(sid, 0)
            self._pass_seq[sid] = seq + 1
        h = packet.header
        return (EncodedPacket(MediaHeader(sid, seq, h.pts, h.time_base, h.capture_time_ns), packet.codec,
                              packet.keyframe, packet.data, packet.dts),)

    def on_keyframe_request(self, request: KeyframeRequest) -> bool:
        if request.stream_id in self._passing or (not request.stream_id and self._passing):
            return False  # the frames going out now were made upstream: so is their keyframe
        targets = [request.stream_id] if request.stream_id else list(self._video)
        for sid in targets:
            state = self._video.get(sid)
            if state is not None:
                state.force_keyframe = True
        self.log.info("keyframe requested on %s: %s", request.stream_id or "all streams", request.reason or "-")
        return True

    def _encode_video(self, frame: VideoFrame) -> list[Message]:
        sid = frame.header.stream_id
        resumed = sid in self._passing
        self._passing.discard(sid)
        state = self._video.get(sid)
        if state is None:
            width = self.settings.width or frame.width
            height = self.settings.height or frame.height
            # x264 and libvpx want even sizes for 4:2:0.
            width, height = width - width % 2, height - height % 2
            if width < 2 or height < 2:
                self.drops["bad_size"] += 1
                message = f"cannot encode a {frame.width}x{frame.height} frame"
                codecs.call_on_loop(self._loop, self.report_error, "bad_size", message, sid)
                return []
            state = VideoStream(video_context(self.settings, width, height), width, height, force_keyframe=True,
                                out_seq=self._pass_seq.pop(sid, 0))
            self._video[sid] = state
            self.log.info("opened %s encoder for %s at %dx%d", self.settings.video_codec.name, sid, width, height)
        if resumed:
            state.force_keyframe = True
        picture = codecs.i420_to_av(frame)
        if (frame.width, frame.height) != (state.width, state.height):
            picture = picture.reformat(width=state.width, height=state.height, format="yuv420p")
            self.scaled_frames += 1
        pts = codecs.rescale(frame.header.pts, frame.header.time_base, codecs.VIDEO_TIME_BASE)
        if pts <= state.last_pts:
            pts = state.last_pts + 1  # encoders need strictly increasing timestamps
        state.last_pts = pts
        picture.pts = pts
        picture.time_base = codecs.VIDEO_TIME_BASE
        if state.force_keyframe:
            picture.pict_type = PictureType.I
            state.force_keyframe = False
            self.forced_keyframes += 1
        if len(state.pending) >= MAX_PENDING_TIMESTAMPS:
            state.pending.pop(next(iter(state.pending)))
        state.pending[pts] = frame.header.capture_time_ns
        self.video_frames_encoded += 1
        return self._video_packets(sid, state, state.context.encode(picture))

    def _video_packets(self, sid: str, state: VideoStream, packets: Iterable[Any]) -> list[Message]:
        out: list[Message] = []
        for packet in packets:
            pts = packet.pts if packet.pts is not None else state.last_pts
            capture_ns = state.pending.pop(pts, 0)
            header = MediaHeader(sid, state.out_seq, pts, codecs.VIDEO_TIME_BASE, capture_ns)
            state.out_seq += 1
            if packet.is_keyframe:
                self.keyframes_out += 1
            out.append(EncodedPacket(header, self.settings.video_codec, packet.is_keyframe, bytes(packet), packet.dts))
        return out

    def _open_audio(self, frame: AudioFrame) -> AudioStream:
        codec = self.settings.audio_codec
        rate = codecs.SAMPLE_RATE_HZ[codec]
        # G.711 and G.722 are mono by definition; Opus keeps the input's channel count (1 or 2).
        channels = min(frame.channels, 2) if codec is Codec.OPUS else 1
        ctx: Any = av.CodecContext.create(codecs.ENCODER_NAMES[codec], "w")
        ctx.sample_rate = rate
        ctx.layout = codecs.layout_name(channels)
        ctx.format = "s16"
        ctx.time_base = Fraction(1, rate)
        if codec is Codec.OPUS:
            ctx.bit_rate = OPUS_BITRATE_BPS
            ctx.options = {"application": "voip", "frame_duration": str(codecs.AUDIO_FRAME_MS)}
        ctx.open()
        resampler = codecs.PrimedResampler(channels, rate)
        fifo = av.AudioFifo()
        self.log.info("opened %s encoder for %s: %d Hz, %d ch", codec.name, frame.header.stream_id, rate, channels)
        return AudioStream(ctx, resampler, fifo, codecs.audio_frame_samples(codec))

    def _encode_audio(self, frame: AudioFrame) -> list[Message]:
        sid = frame.header.stream_id
        state = self._audio.get(sid)
        if state is None:
            state = self._open_audio(frame)
            self._audio[sid] = state
        rate = state.context.sample_rate
        in_pts_s = float(frame.header.pts * frame.header.time_base)
        if state.next_pts is None or (
            state.expected_in_pts_s is not None and abs(in_pts_s - state.expected_in_pts_s) > AUDIO_RESYNC_THRESHOLD_S
        ):
            # Start (or restart after a discontinuity): continue from the input's own clock.
            buffered = state.fifo.samples
            state.next_pts = round(in_pts_s * rate) - buffered
        state.expected_in_pts_s = in_pts_s + frame.samples / frame.sample_rate
        first_new_sample = state.next_pts + state.fifo.samples
        state.captures.append((first_new_sample, frame.header.capture_time_ns))
        if state.input_format not in (None, (frame.sample_rate, frame.channels)):
            # PyAV's resampler is fixed to its first input; a stream that changes rate or layout gets a new one.
            self.log.info("%s: audio input changed to %d Hz, %d ch", sid, frame.sample_rate, frame.channels)
            ctx = state.context
            state.resampler = codecs.PrimedResampler(len(ctx.layout.channels), ctx.sample_rate)
        state.input_format = (frame.sample_rate, frame.channels)
        for converted in state.resampler.resample(codecs.s16_to_av(frame)):
            converted.pts = None
            state.fifo.write(converted)
        return self._drain_audio(sid, state, final=False)

    def _drain_audio(self, sid: str, state: AudioStream, final: bool) -> list[Message]:
        out: list[Message] = []
        ctx = state.context
        while state.fifo.samples >= state.frame_samples or (final and state.fifo.samples > 0):
            if state.fifo.samples >= state.frame_samples:
                chunk = state.fifo.read(state.frame_samples)
            else:
                chunk = self._pad_silence(state)
            assert state.next_pts is not None
            chunk.pts = state.next_pts
            if state.first_chunk_pts is None:
                state.first_chunk_pts = state.next_pts
            chunk.time_base = ctx.time_base
            chunk.sample_rate = ctx.sample_rate
            state.next_pts += chunk.samples
            out.extend(self._audio_packets(sid, state, ctx.encode(chunk)))
        if final:
            out.extend(self._audio_packets(sid, state, ctx.encode(None)))
        return out

    def _pad_silence(self, state: AudioStream) -> Any:
        """The last partial chunk at end of stream, padded with silence to a whole codec frame."""
        tail = state.fifo.read(state.fifo.samples)
        channels = len(tail.layout.channels)
        samples = np.zeros((1, state.frame_samples * channels), dtype=np.int16)
        samples[0, : tail.samples * channels] = tail.to_ndarray().reshape(-1)
        return av.AudioFrame.from_ndarray(samples, format="s16", layout=tail.layout.name)

    def _audio_packets(self, sid: str, state: AudioStream, packets: Iterable[Any]) -> list[Message]:
        out: list[Message] = []
        codec = self.settings.audio_codec
        time_base = state.context.time_base
        for packet in packets:
            pts = packet.pts if packet.pts is not None else (state.next_pts or 0)
            if state.pts_offset is None:
                state.pts_offset = (state.first_chunk_pts or 0) - pts if packet.pts is not None else 0
            pts += state.pts_offset
            # The capture time of the input frame that holds this packet's first sample.
            while len(state.captures) > 1 and state.captures[1][0] <= pts:
                state.captures.popleft()
            capture_ns = state.captures[0][1] if state.captures else 0
            header = MediaHeader(sid, state.out_seq, pts, time_base, capture_ns)
            state.out_seq += 1
            out.append(EncodedPacket(header, codec, True, bytes(packet), None))
        return out

    def flush(self, stream_id: str) -> Iterable[Message]:
        out: list[Message] = []
        for sid in [stream_id] if stream_id else list(self._video):
            video = self._video.pop(sid, None)
            if video is not None:
                out.extend(self._video_packets(sid, video, video.context.encode(None)))
        for sid in [stream_id] if stream_id else list(self._audio):
            audio = self._audio.pop(sid, None)
            if audio is not None and audio.next_pts is not None:
                out.extend(self._drain_audio(sid, audio, final=True))
        return out

    def teardown(self) -> None:
        self._video.clear()
        self._audio.clear()

    def extra_figures(self) -> dict[str, Any]:
        return {
            "video_codec": self.settings.video_codec.name,
            "audio_codec": self.settings.audio_codec.name,
            "keyframes_out": self.keyframes_out,
            "forced_keyframes": self.forced_keyframes,
            "scaled_frames": self.scaled_frames,
            "packets_passed": self.packets_passed,
            "video_frames_encoded": self.video_frames_encoded,
            "video_streams": {sid: f"{s.width}x{s.height}" for sid, s in self._video.items()},
        }


VIDEO_CODEC_CHOICES = codecs.names(video=True, encodable=True)
AUDIO_CODEC_CHOICES = codecs.names(video=False, encodable=True)


@click.command("encoder")
@stage_options("encoder")
@click.option("--video-codec", type=click.Choice(VIDEO_CODEC_CHOICES), default="h264", show_default=True)
@click.option("--audio-codec", type=click.Choice(AUDIO_CODEC_CHOICES), default="opus", show_default=True)
@click.option("--width", type=click.IntRange(2, 8192), default=None, help="Output width [input width].")
@click.option("--height", type=click.IntRange(2, 8192), default=None, help="Output height [input height].")
@click.option("--fps", type=click.IntRange(1, 240), default=DEFAULT_FPS, show_default=True,
              help="Frame rate given to rate control and the keyframe interval (frames are not dropped).")
@click.option("--bitrate-kbps", type=click.IntRange(16, 100_000), default=DEFAULT_BITRATE_KBPS, show_default=True)
@click.option("--keyframe-interval-s", type=click.FloatRange(0.04, 3600), default=DEFAULT_KEYFRAME_INTERVAL_S,
              show_default=True)
@click.option("--preset", default=DEFAULT_PRESET, show_default=True, help="libx264 preset.")
@click.option("--threads", type=click.IntRange(0, 16), default=0, show_default=True,
              help="Encoder threads per video stream (0 = automatic).")
def command(**params: Any) -> None:
    """Encode raw video to H.264/VP8 and raw audio to Opus/PCMU/PCMA/G.722."""
    options = build_options(params)
    settings = EncoderSettings(
        video_codec=codecs.codec_from_name(params["video_codec"]),
        audio_codec=codecs.codec_from_name(params["audio_codec"]),
        width=params["width"],
        height=params["height"],
        fps=params["fps"],
        bitrate_kbps=params["bitrate_kbps"],
        keyframe_interval_s=params["keyframe_interval_s"],
        preset=params["preset"],
        threads=params["threads"],
    )
    run(Encoder(options, settings))

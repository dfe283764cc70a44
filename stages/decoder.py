"""The decoder stage: encoded packets in, raw I420 video and s16 audio out.

One PyAV codec context per stream id, created lazily on the stage's codec thread
the first time a stream's packet arrives. Raw frames pass through unchanged.

Damage handling (never a crash):
* a packet FFmpeg rejects, or one that fails the cheap structural checks in
  ``stages.codecs.check_payload``, is dropped (``drops["corrupt"]``), reported with
  an ErrorReport, and a keyframe request is sent upstream;
* a sequence-number gap on a video stream means a lost reference: the decoder asks
  upstream for a keyframe and drops (``drops["await_keyframe"]``) until one arrives.

Passthrough (``--pass-video``): video of the named codecs leaves this stage as it came
(still encoded), with the same keyframe gating, for a consumer that takes it encoded: the
bot's page decodes the SIP side's H.264 and VP8 itself (``--pass-video h264 --pass-video
vp8``); the SIP side takes the room's H.264 only in the profile it was offered
(``--pass-video h264-offer``: an SPS that does not fit, another profile or a higher
level, is decoded as usual; each keyframe with an SPS decides again).

Keyframe requests originate on the codec thread (inside ``process``) while the
control sockets belong to the event loop, so they are handed to the loop with
``run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import click
import numpy as np

from protocol import AudioFrame, Codec, EncodedPacket, MediaHeader, Message, VideoFrame
from stages import codecs
from stages.base import Stage, StageOptions
from stages.options import build_options, run, stage_options

# Bound the pts -> capture time map so a decoder that never returns a frame cannot grow it.
MAX_PENDING_TIMESTAMPS = 64
# While waiting for a keyframe, ask again this often (the first request may be lost or ignored).
KEYFRAME_REPEAT_INTERVAL_S = 1.0
# --pass-video: codec and whether its SPS must fit the SIP offer's profile.
PASS_VIDEO_SPECS = {"h264": (Codec.H264, False), "h264-offer": (Codec.H264, True), "vp8": (Codec.VP8, False)}


@dataclass
class DecodeStream:
    codec: Codec
    context: Any  # av.CodecContext
    channels: int = 0
    last_seq: int | None = None
    # Video only: drop until a keyframe restarts the picture chain.
    await_keyframe: bool = True
    out_seq: int = 0
    # pts -> (capture_time_ns, time_base) of packets sent into the decoder, for the frames that come out.
    pending: dict[int, tuple[int, Any]] = field(default_factory=dict)
    last_header: MediaHeader | None = None
    last_request_s: float = -1e9  # monotonic time of the last keyframe request sent for this stream
    resampler: Any = None  # av.AudioResampler to packed s16, made on the first non-s16 frame
    resampled_pts: int | None = None  # next pts, in samples at the decoder's output rate (audio_rate set)
    passing: bool = False  # video: forwarded encoded (pass_video), decided at each keyframe that carries an SPS


class Decoder(Stage):
    media_thread = True  # its media never touches the event loop (stages/base.py)

    def __init__(self, options: StageOptions, opus_channels: int = 2, threads: int = 1, audio_rate: int = 0,
                 pass_video: dict[Codec, bool] | None = None) -> None:
        super().__init__(options)
        # Video of these codecs leaves undecoded; True: only H.264 whose SPS fits the SIP offer's profile.
        self.pass_video = pass_video or {}
        self.packets_passed = 0
        self.opus_channels = opus_channels
        # 0 keeps each codec's own rate; else audio leaves resampled to this rate (saves a transformer hop).
        self.audio_rate = audio_rate
        self.threads = threads
        self._decoders: dict[str, DecodeStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.keyframes_in = 0
        self.frames_decoded = 0

    async def run(self) -> int:
        # Keep the loop so codec-thread code can schedule keyframe requests on it.
        self._loop = asyncio.get_running_loop()
        return await super().run()

    # ----- codec thread ---------------------------------------------------------------------
    def process(self, msg: Message) -> Iterable[Message]:
        if not isinstance(msg, EncodedPacket):
            return (msg,)  # raw frames and anything else pass through
        if ("video" if msg.codec.is_video else "audio") in self.refused_kinds:
            # The SIP peer refused this kind: nothing downstream would use the pictures. When a later call takes it,
            # the sequence gap makes this decoder ask for a keyframe before it decodes again.
            self.drops["refused_by_peer"] += 1
            return ()
        return self._decode(msg)

    def _decode(self, packet: EncodedPacket) -> list[Message]:
        sid = packet.header.stream_id
        state = self._decoders.get(sid)
        if state is not None and state.codec is not packet.codec:
            self.log.info("stream %s changed codec %s -> %s: new decoder", sid, state.codec.name, packet.codec.name)
            self._decoders.pop(sid)
            state = None
        if state is None:
            try:
                state = self._open(packet.codec)
            except (ValueError, av.FFmpegError) as exc:
                self.drops["unsupported_codec"] += 1
                self._report("unsupported_codec", str(exc), sid)
                return []
            self._decoders[sid] = state
        video = packet.codec.is_video
        keyframe = False
        seq = packet.header.seq
        gap = state.last_seq is not None and seq != state.last_seq + 1
        state.last_seq = seq
        if video:
            keyframe = packet.keyframe or codecs.is_keyframe_payload(packet.codec, packet.data)
            if keyframe:
                self.keyframes_in += 1
            if gap and not keyframe:
                self.drops["seq_gap"] += 1
                if not state.await_keyframe:
                    state.await_keyframe = True
                    self._request_keyframe(sid, f"sequence gap before seq {seq}", state)
            if keyframe and packet.codec in self.pass_video:
                passing = codecs.h264_fits_offer(packet.data) if self.pass_video[packet.codec] else True
                if passing is not None and passing != state.passing:
                    state.passing = passing
                    self.log.info("%s: %s", sid, "passed on encoded" if passing else
                                  "decoded: its H.264 profile or level is not the one the SIP side was offered")
            if state.await_keyframe:
                if not keyframe:
                    self.drops["await_keyframe"] += 1
                    # Requests can be lost or ignored (a stage restarting upstream): repeat them, spaced out.
                    if time.monotonic() - state.last_request_s >= KEYFRAME_REPEAT_INTERVAL_S:
                        self._request_keyframe(sid, "waiting for a keyframe", state)
                    return []
                state.await_keyframe = False
        problem = codecs.check_payload(packet.codec, packet.data)
        if problem is not None:
            return self._corrupt(state, sid, problem)
        if state.passing:
            return [self._passed(state, packet, keyframe)]
        av_packet = av.Packet(bytes(packet.data))
        av_packet.pts = packet.header.pts
        av_packet.dts = packet.dts if packet.dts is not None else packet.header.pts
        av_packet.time_base = packet.header.time_base
        if len(state.pending) >= MAX_PENDING_TIMESTAMPS:
            state.pending.pop(next(iter(state.pending)))
        state.pending[packet.header.pts] = (packet.header.capture_time_ns, packet.header.time_base)
        state.last_header = packet.header
        try:
            frames = state.context.decode(av_packet)
        except (av.FFmpegError, ValueError) as exc:
            return self._corrupt(state, sid, f"{type(exc).__name__}: {exc}")
        return [m for m in (self._to_message(state, sid, frame) for frame in frames) if m is not None]

    def _passed(self, state: DecodeStream, packet: EncodedPacket, keyframe: bool) -> EncodedPacket:
        """The packet as it came, numbered in this stage's sequence for its stream."""
        h = packet.header
        state.out_seq += 1
        self.packets_passed += 1
        return EncodedPacket(MediaHeader(h.stream_id, state.out_seq - 1, h.pts, h.time_base, h.capture_time_ns),
                             packet.codec, keyframe, packet.data, packet.dts)

    def _corrupt(self, state: DecodeStream, sid: str, problem: str) -> list[Message]:
        self.drops["corrupt"] += 1
        self._report("corrupt_packet", f"{state.codec.name}: {problem}", sid)
        if state.codec.is_video:
            state.await_keyframe = True
            self._request_keyframe(sid, f"corrupt {state.codec.name} packet", state)
        return []

    def _open(self, codec: Codec) -> DecodeStream:
        ctx: Any = av.CodecContext.create(codecs.decoder_name(codec), "r")
        channels = 0
        if codec.is_video:
            # Slice threads only: frame threads would hold frames back and add latency.
            ctx.thread_type = "SLICE"
            ctx.thread_count = self.threads
        else:
            channels = self.opus_channels if codec is Codec.OPUS else codecs.DEFAULT_CHANNELS[codec]
            ctx.sample_rate = codecs.SAMPLE_RATE_HZ[codec]
            ctx.layout = codecs.layout_name(channels)
        ctx.open()
        self.log.info("opened %s decoder (%s)", codec.name, ctx.name)
        return DecodeStream(codec, ctx, channels=channels, await_keyframe=codec.is_video)

    def _to_message(self, state: DecodeStream, sid: str, frame: Any) -> Message | None:
        last = state.last_header
        assert last is not None
        pts = frame.pts if frame.pts is not None else last.pts
        capture_ns, time_base = state.pending.pop(pts, (last.capture_time_ns, last.time_base))
        header = MediaHeader(sid, state.out_seq, pts, time_base, capture_ns)
        state.out_seq += 1
        self.frames_decoded += 1
        if isinstance(frame, av.VideoFrame):
            width, height, data = codecs.av_to_i420(frame)
            return VideoFrame(header, width, height, data)
        return self._audio_message(state, header, frame)

    def _audio_message(self, state: DecodeStream, header: MediaHeader, frame: av.AudioFrame) -> AudioFrame | None:
        channels = len(frame.layout.channels)
        rate = self.audio_rate or frame.sample_rate
        if frame.format.name != "s16" or rate != frame.sample_rate:
            # Opus decodes to planar float; the wire wants interleaved s16 (at the codec's or the asked-for rate).
            if state.resampler is None:
                state.resampler = av.AudioResampler(format="s16", layout=frame.layout.name, rate=rate)
            converted = [codecs.av_to_s16(f) for f in state.resampler.resample(frame)]
            data = np.concatenate(converted) if converted else np.zeros(0, dtype=np.int16)
            if rate != frame.sample_rate:
                # pts counts samples at the output rate from the first frame's position on.
                if state.resampled_pts is None:
                    state.resampled_pts = round(header.pts * header.time_base * rate)
                header = MediaHeader(header.stream_id, header.seq, state.resampled_pts, Fraction(1, rate),
                                     header.capture_time_ns)
                state.resampled_pts += data.size // channels
        else:
            data = codecs.av_to_s16(frame)
        if data.size == 0:
            return None  # the resampler may hold back a few samples; nothing to send yet
        return codecs.make_audio_frame(header, rate, channels, data)

    def flush(self, stream_id: str) -> Iterable[Message]:
        out: list[Message] = []
        for sid in [stream_id] if stream_id else list(self._decoders):
            state = self._decoders.pop(sid, None)
            if state is None or state.last_header is None:
                continue
            try:
                for frame in state.context.decode(None):
                    msg = self._to_message(state, sid, frame)
                    if msg is not None:
                        out.append(msg)
            except (av.FFmpegError, ValueError) as exc:
                self._report("flush_failed", f"{type(exc).__name__}: {exc}", sid)
        return out

    def teardown(self) -> None:
        self._decoders.clear()

    def extra_figures(self) -> dict[str, Any]:
        return {
            "decoders": {sid: s.codec.name for sid, s in self._decoders.items()},
            "frames_decoded": self.frames_decoded,
            "keyframes_in": self.keyframes_in,
            "packets_passed": self.packets_passed,
            "passed_streams": sorted(sid for sid, s in self._decoders.items() if s.passing),
        }

    def _report(self, code: str, message: str, stream_id: str = "") -> None:
        codecs.call_on_loop(self._loop, self.report_error, code, message, stream_id)

    def _request_keyframe(self, stream_id: str, reason: str, state: DecodeStream) -> None:
        """Ask upstream for a keyframe from the codec thread (the sockets live on the event loop)."""
        state.last_request_s = time.monotonic()
        self.request_keyframe_threadsafe(stream_id, reason)


@click.command("decoder")
@stage_options("decoder")
@click.option("--opus-channels", type=click.IntRange(1, 2), default=2, show_default=True,
              help="Channels Opus is decoded to (SDP always says 2; mono streams come out duplicated).")
@click.option("--threads", type=click.IntRange(0, 16), default=1, show_default=True,
              help="Slice threads per video decoder (0 = one per core).")
@click.option("--audio-rate", type=click.IntRange(0, 192000), default=0, show_default=True,
              help="Resample decoded audio to this rate in Hz (0 = the codec's own rate).")
@click.option("--pass-video", type=click.Choice(sorted(PASS_VIDEO_SPECS)), multiple=True,
              help="Pass this codec's video on encoded (repeatable); h264-offer: only H.264 whose SPS fits the "
                   "profile the SIP side is offered, the rest decoded.")
def command(**params: Any) -> None:
    """Decode H.264/VP8/VP9/Opus/G.711/G.722 packets into raw I420 video and s16 audio."""
    options = build_options(params)
    pass_video = dict(PASS_VIDEO_SPECS[spec] for spec in params.pop("pass_video"))
    run(Decoder(options, **params, pass_video=pass_video))

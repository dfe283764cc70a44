"""The codec registry, and codec helpers shared by the stages.

``CODECS`` is the one table of codec facts: name, wire codec id, RTP clock, default payload type, SDP rtpmap and
fmtp, FFmpeg encoder and decoder names, keyframe detection, browser MIME type. The stages, the janus stage's SDP,
the bridge configuration and the test harness read it (tests/test_codec_registry.py checks they agree). Also here:
the conversions between wire frames (one contiguous I420 buffer, s16 interleaved samples) and PyAV frames.
Everything is pure (no sockets); the PyAV parts run on a stage's codec thread. PyAV is imported where it is used,
so that reading the table (the bridge configuration, ``sipbridge up``) does not load FFmpeg.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol import AudioFrame, Codec, MediaHeader, VideoFrame, i420_size
from protocol.wire import Payload as Buffer

if TYPE_CHECKING:
    import av

# RTP clock of every video codec (RFC 6184, RFC 7741, RFC 7587 ...).
VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_HZ)
# Every audio codec here is packetised in 20 ms frames on the SIP and WebRTC legs.
AUDIO_FRAME_MS = 20


@dataclass(frozen=True)
class CodecInfo:
    """Everything the project knows about one codec; every other codec table is derived from ``CODECS``."""

    name: str  # on command lines and in bridge files: "h264", "pcmu"
    codec: Codec  # the wire format's codec id
    rtp_name: str  # the SDP encoding name (a=rtpmap:PT NAME/CLOCK), as RFCs spell it
    clock_hz: int  # RTP clock
    mime: str  # the browser's RTCRtpCodec mimeType (WebRTC spelling; compare case-insensitively)
    decoders: tuple[str, ...]  # FFmpeg decoders, preferred first
    encoder: str | None  # the FFmpeg encoder the encoder stage uses; None: not encoded here
    sample_rate_hz: int | None = None  # audio: the rate the codec runs at (G.722: 16 kHz on an 8 kHz RTP clock)
    channels: int | None = None  # audio: SDP channels, and what a decoder produces when nothing else is known
    payload_type: int | None = None  # RFC 3551 static payload type; None: dynamic (96..127)
    fmtp: str | None = None  # what our SDP offer says in a=fmtp
    sip: bool = False  # the janus stage can send it to a SIP peer (aiortc packetises it, Janus relays it)
    keyframe: Callable[[memoryview], bool] | None = None  # video: whether a payload starts a decodable picture
    webcodecs: str | None = None  # video: the codec string the bot's page configures a WebCodecs VideoDecoder with

    @property
    def is_video(self) -> bool:
        return self.codec.is_video

    @property
    def rtpmap(self) -> str:
        """The a=rtpmap value after the payload type: NAME/CLOCK[/CHANNELS]."""
        channels = f"/{self.channels}" if self.channels and self.channels > 1 else ""
        return f"{self.rtp_name}/{self.clock_hz}{channels}"


def _vp8_keyframe(view: memoryview) -> bool:
    # Frame tag bit 0 is 0 on key frames, which carry the start code 9d 01 2a (RFC 6386 sections 9.1, 9.3).
    return len(view) >= 10 and view[0] & 0x01 == 0 and bytes(view[3:6]) == b"\x9d\x01\x2a"


def _vp9_keyframe(view: memoryview) -> bool:
    if not view:
        return False
    b = view[0]
    # frame_marker=2, then profile bits, show_existing_frame, frame_type (0 = key); profiles 0..2.
    return (b >> 6) == 2 and (b >> 4) & 0x3 != 3 and not (b >> 3) & 1 and not (b >> 2) & 1


def _h264_keyframe(view: memoryview) -> bool:
    # An IDR slice (NAL type 5) or a sequence parameter set (7) starts a decodable picture.
    return any(nal_type in (5, 7) for nal_type in h264_nal_types(view))


# The one codec table. Decoders are FFmpeg's own where it has one (fast, what ffmpeg(1) picks by default); the
# encoders are the libraries WebRTC endpoints expect. H.264 is offered as one profile (constrained baseline 3.1,
# packetization-mode 1); Opus as 2 channels in SDP (RFC 7587), which a mono stream decodes to fine.
CODECS: tuple[CodecInfo, ...] = (
    CodecInfo("h264", Codec.H264, "H264", VIDEO_CLOCK_HZ, "video/H264", ("h264",), "libx264",
              fmtp="level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f", sip=True,
              keyframe=_h264_keyframe, webcodecs="avc1.42E01F"),
    CodecInfo("vp8", Codec.VP8, "VP8", VIDEO_CLOCK_HZ, "video/VP8", ("vp8", "libvpx"), "libvpx", sip=True,
              keyframe=_vp8_keyframe, webcodecs="vp8"),
    CodecInfo("vp9", Codec.VP9, "VP9", VIDEO_CLOCK_HZ, "video/VP9", ("vp9", "libvpx-vp9"), "libvpx-vp9",
              keyframe=_vp9_keyframe),
    CodecInfo("av1", Codec.AV1, "AV1", VIDEO_CLOCK_HZ, "video/AV1", ("libdav1d", "av1", "libaom-av1"), None),
    CodecInfo("pcmu", Codec.PCMU, "PCMU", 8_000, "audio/PCMU", ("pcm_mulaw",), "pcm_mulaw", 8_000, 1, 0, sip=True),
    CodecInfo("pcma", Codec.PCMA, "PCMA", 8_000, "audio/PCMA", ("pcm_alaw",), "pcm_alaw", 8_000, 1, 8, sip=True),
    # G.722 keeps an 8000 RTP clock for historical reasons (RFC 3551 section 4.5.2) although it samples at 16 kHz.
    CodecInfo("g722", Codec.G722, "G722", 8_000, "audio/G722", ("g722",), "g722", 16_000, 1, 9, sip=True),
    CodecInfo("opus", Codec.OPUS, "opus", 48_000, "audio/opus", ("opus", "libopus"), "libopus", 48_000, 2, sip=True),
)
BY_CODEC: dict[Codec, CodecInfo] = {info.codec: info for info in CODECS}
BY_NAME: dict[str, CodecInfo] = {info.name: info for info in CODECS}
BY_RTP_NAME: dict[str, CodecInfo] = {info.rtp_name.upper(): info for info in CODECS}  # upper-cased keys
BY_MIME: dict[str, CodecInfo] = {info.mime.lower(): info for info in CODECS}  # lower-cased keys
BY_STATIC_PAYLOAD_TYPE: dict[int, CodecInfo] = {i.payload_type: i for i in CODECS if i.payload_type is not None}


def names(*, video: bool | None = None, sip: bool | None = None, encodable: bool | None = None) -> list[str]:
    """Codec names in table order, optionally only video (or audio), SIP-capable, or encodable ones."""
    return [i.name for i in CODECS if (video is None or i.is_video == video) and (sip is None or i.sip == sip)
            and (encodable is None or (i.encoder is not None) == encodable)]


# Derived views the stages use.
DECODER_NAMES: dict[Codec, tuple[str, ...]] = {i.codec: i.decoders for i in CODECS}
ENCODER_NAMES: dict[Codec, str] = {i.codec: i.encoder for i in CODECS if i.encoder is not None}
# Sample rate the codec itself runs at.
SAMPLE_RATE_HZ: dict[Codec, int] = {i.codec: i.sample_rate_hz for i in CODECS if i.sample_rate_hz is not None}
RTP_CLOCK_HZ: dict[Codec, int] = {i.codec: i.clock_hz for i in CODECS}
# Channels a decoder produces when nothing else is known.
DEFAULT_CHANNELS: dict[Codec, int] = {i.codec: i.channels for i in CODECS if i.channels is not None}

CODEC_BY_NAME: dict[str, Codec] = {c.name.lower(): c for c in Codec}


def codec_from_name(name: str) -> Codec:
    """``"h264"``/``"H264"``/``"vp8"``/``"opus"``/``"pcmu"`` ... to the wire enum."""
    try:
        return CODEC_BY_NAME[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown codec {name!r} (known: {', '.join(sorted(CODEC_BY_NAME))})") from None


def audio_frame_samples(codec: Codec) -> int:
    """Samples per channel in one 20 ms frame at the codec's sample rate."""
    return SAMPLE_RATE_HZ[codec] * AUDIO_FRAME_MS // 1000


def decoder_name(codec: Codec) -> str:
    import av

    for name in DECODER_NAMES.get(codec, ()):
        if name in av.codecs_available:
            return name
    raise ValueError(f"no FFmpeg decoder available for {codec.name}")


def rescale(value: int, src: Fraction, dst: Fraction) -> int:
    """Convert a timestamp between time bases, rounding to nearest."""
    return round(value * src / dst)


def call_on_loop(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn`` on the stage's event loop from the codec thread.

    The stage's sockets are zmq.asyncio sockets owned by the loop (``Stage.report_error`` publishes on
    one), so codec-thread code must not touch them directly. Without a loop (in-process use) call directly.
    """
    if loop is None or not loop.is_running():
        fn(*args)
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(*args)
    else:
        loop.call_soon_threadsafe(fn, *args)


# ----- bitstream peeks ------------------------------------------------------------------------------
def is_keyframe_payload(codec: Codec, data: Buffer) -> bool:
    """Whether an encoded payload starts a decodable picture, read from the bitstream itself (False for audio
    and for a codec without a detector).

    Used next to the packet's keyframe flag so a producer that does not set it still resynchronises.
    """
    detect = BY_CODEC[codec].keyframe
    return detect is not None and detect(memoryview(data).cast("B"))


def h264_nal_types(view: memoryview) -> list[int]:
    """NAL unit types of an Annex B access unit (start codes 00 00 01 / 00 00 00 01)."""
    data = bytes(view)
    types = []
    start = data.find(b"\x00\x00\x01")
    while start != -1 and start + 3 < len(data):
        types.append(data[start + 3] & 0x1F)
        start = data.find(b"\x00\x00\x01", start + 3)
    return types


def h264_sps_profile(data: Buffer) -> tuple[int, int, int] | None:
    """(profile_idc, constraint flags byte, level_idc) of the first sequence parameter set in an Annex B access
    unit; None when it carries none."""
    view = bytes(memoryview(data).cast("B"))
    start = view.find(b"\x00\x00\x01")
    while start != -1 and start + 3 < len(view):
        if view[start + 3] & 0x1F == 7 and start + 7 <= len(view):
            return view[start + 4], view[start + 5], view[start + 6]
        start = view.find(b"\x00\x00\x01", start + 3)
    return None


def _offered_h264_profile() -> tuple[int, int]:
    """(profile_idc, level_idc) of the H.264 profile our SDP offers (the registry's profile-level-id)."""
    fmtp = BY_CODEC[Codec.H264].fmtp or ""
    value = dict(part.split("=", 1) for part in fmtp.split(";") if "=" in part)["profile-level-id"]
    return int(value[0:2], 16), int(value[4:6], 16)


def h264_fits_offer(data: Buffer) -> bool | None:
    """Whether an H.264 access unit's SPS fits the profile our SIP offer names (baseline, its level or lower), so a
    SIP peer that took our offer can decode it as it is; None when the access unit carries no SPS.

    Baseline without constraint_set1 is accepted: WebRTC encoders send constrained baseline with or without the
    flag, and neither uses the baseline tools (FMO, ASO) a constrained-baseline decoder lacks."""
    sps = h264_sps_profile(data)
    if sps is None:
        return None
    profile_idc, level_idc = _offered_h264_profile()
    return sps[0] == profile_idc and sps[2] <= level_idc


def check_payload(codec: Codec, data: Buffer) -> str | None:
    """Cheap structural checks FFmpeg does not do (it conceals damage instead); returns a problem or None."""
    view = memoryview(data).cast("B")
    if codec is Codec.VP8:
        if len(view) < 3:
            return "VP8 payload shorter than its frame tag"
        tag = view[0] | view[1] << 8 | view[2] << 16
        first_partition_bytes = tag >> 5
        header_bytes = 10 if tag & 1 == 0 else 3
        if tag & 1 == 0 and bytes(view[3:6]) != b"\x9d\x01\x2a":
            return "VP8 key frame without its start code"
        if header_bytes + first_partition_bytes > len(view):
            return f"VP8 payload truncated: first partition needs {first_partition_bytes} bytes"
    elif codec is Codec.H264:
        head = bytes(view[:4])
        if not (head.startswith(b"\x00\x00\x01") or head == b"\x00\x00\x00\x01"):
            return "H.264 payload does not start with an Annex B start code"
        data_bytes = bytes(view)
        start = data_bytes.find(b"\x00\x00\x01")
        while start != -1:
            if start + 3 >= len(data_bytes):
                return "H.264 payload ends inside a NAL unit header"
            if data_bytes[start + 3] & 0x80:
                return "H.264 NAL unit with the forbidden bit set"
            start = data_bytes.find(b"\x00\x00\x01", start + 3)
    return None


# ----- video frames ---------------------------------------------------------------------------------
def _buffer(plane: Any) -> Any:
    # PyAV planes implement the buffer protocol (writable) but are not typed as buffers.
    return plane


def chroma_size(width: int, height: int) -> tuple[int, int]:
    return (width + 1) // 2, (height + 1) // 2


def i420_to_av(frame: VideoFrame) -> av.VideoFrame:
    """Wire I420 (contiguous Y, U, V) to a yuv420p ``av.VideoFrame``.

    Even sizes wrap the received buffer without copying (the encoders copy the picture in themselves);
    odd sizes are copied into FFmpeg's padded planes.
    """
    import av

    w, h = frame.width, frame.height
    cw, ch = chroma_size(w, h)
    src = np.frombuffer(frame.data, dtype=np.uint8)
    if src.size != i420_size(w, h):
        raise ValueError(f"I420 payload is {src.size} bytes, {w}x{h} needs {i420_size(w, h)}")
    if w % 2 == 0 and h % 2 == 0:
        return av.VideoFrame.from_numpy_buffer(src.reshape(h * 3 // 2, w), format="yuv420p")
    out = av.VideoFrame(w, h, "yuv420p")
    offset = 0
    for plane, (pw, ph) in zip(out.planes, ((w, h), (cw, ch), (cw, ch)), strict=True):
        dst = np.frombuffer(_buffer(plane), dtype=np.uint8).reshape(-1, plane.line_size)
        dst[:ph, :pw] = src[offset : offset + pw * ph].reshape(ph, pw)
        offset += pw * ph
    return out


def av_to_i420(frame: av.VideoFrame) -> tuple[int, int, memoryview]:
    """A decoded ``av.VideoFrame`` to (width, height, contiguous I420 buffer), converting other formats.

    One copy: FFmpeg's planes are separate and padded, the wire wants them back to back.
    """
    if frame.format.name not in ("yuv420p", "yuvj420p"):
        frame = frame.reformat(format="yuv420p")
    w, h = frame.width, frame.height
    cw, ch = chroma_size(w, h)
    out = np.empty(i420_size(w, h), dtype=np.uint8)
    offset = 0
    for plane, (pw, ph) in zip(frame.planes, ((w, h), (cw, ch), (cw, ch)), strict=True):
        src = np.frombuffer(_buffer(plane), dtype=np.uint8)
        if plane.line_size == pw:
            out[offset : offset + pw * ph] = src[: pw * ph]
        else:
            out[offset : offset + pw * ph].reshape(ph, pw)[:] = src.reshape(-1, plane.line_size)[:ph, :pw]
        offset += pw * ph
    return w, h, memoryview(_buffer(out))


def y_plane(frame: VideoFrame) -> np.ndarray:
    """The luma plane of a wire frame as a (height, width) array view."""
    return np.frombuffer(frame.data, dtype=np.uint8, count=frame.width * frame.height).reshape(
        frame.height, frame.width
    )


# ----- audio frames ---------------------------------------------------------------------------------
def layout_name(channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


def s16_to_av(frame: AudioFrame) -> av.AudioFrame:
    """Wire s16 interleaved audio to a packed-s16 ``av.AudioFrame``."""
    import av

    samples = np.frombuffer(frame.data, dtype="<i2").reshape(1, frame.samples * frame.channels)
    out = av.AudioFrame.from_ndarray(samples, format="s16", layout=layout_name(frame.channels))
    out.sample_rate = frame.sample_rate
    return out


def av_to_s16(frame: av.AudioFrame) -> np.ndarray:
    """A packed-s16 ``av.AudioFrame`` to a flat interleaved int16 array."""
    if frame.format.name != "s16":
        raise ValueError(f"expected packed s16, got {frame.format.name}")
    return frame.to_ndarray().reshape(-1)


# libswresample keeps the last few output samples of each input until the next input arrives (its filter needs
# samples ahead): 16 at 48 -> 8 kHz. A bigger shortfall than this is not that, and is left alone.
RESAMPLER_PRIME_MAX_SAMPLES = 256


class PrimedResampler:
    """A packed-s16 ``av.AudioResampler`` whose output starts with silence where it holds samples back.

    Downstream, audio is cut into 20 ms codec frames or mix chunks. Without the silence, every such chunk ends a
    few samples into the next input frame and waits for it: 20 ms of latency on every packet. With it, the output
    runs those few samples (2 ms at 48 -> 8 kHz) behind its input, as a causal filter's would, and a chunk is
    complete as soon as the input frame it ends with has arrived. Fixed to its first input's rate and layout, as
    PyAV's resampler is: make a new one when they change.
    """

    def __init__(self, channels: int, rate: int) -> None:
        import av

        self.rate = rate
        self.channels = channels
        self.layout = layout_name(channels)
        self._resampler = av.AudioResampler(format="s16", layout=self.layout, rate=rate)
        self._primed = False

    def resample(self, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        """Resample ``frame`` (None flushes what is held back)."""
        out: list[av.AudioFrame] = self._resampler.resample(frame)
        if frame is None or self._primed:
            return out
        self._primed = True
        shortfall = round(frame.samples * self.rate / frame.sample_rate) - sum(f.samples for f in out)
        if not 0 < shortfall <= RESAMPLER_PRIME_MAX_SAMPLES:
            return out
        import av

        silence = av.AudioFrame.from_ndarray(np.zeros((1, shortfall * self.channels), dtype=np.int16),
                                             format="s16", layout=self.layout)
        silence.sample_rate = self.rate
        return [silence, *out]


def make_audio_frame(header: MediaHeader, sample_rate: int, channels: int, samples: np.ndarray) -> AudioFrame:
    count = samples.size // channels
    return AudioFrame(header, sample_rate, channels, count, samples.astype("<i2", copy=False).tobytes())

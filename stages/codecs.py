"""Codec helpers shared by the decoder and encoder stages.

What lives here: the mapping between the wire ``Codec`` enum and FFmpeg codec
names, RTP clock rates and codec sample rates, and the conversions between wire
frames (one contiguous I420 buffer, s16 interleaved samples) and PyAV frames.
Everything is pure (no sockets); the PyAV parts run on a stage's codec thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
import numpy as np

from protocol import AudioFrame, Codec, MediaHeader, VideoFrame, i420_size
from protocol.wire import Payload as Buffer

# RTP clock of every video codec (RFC 6184, RFC 7741, RFC 7587 ...).
VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_HZ)
# Every audio codec here is packetised in 20 ms frames on the SIP and WebRTC legs.
AUDIO_FRAME_MS = 20

# FFmpeg names: the decoders are FFmpeg's own (fast, and the ones ffmpeg(1) picks by default);
# the encoders are the libraries WebRTC endpoints expect.
DECODER_NAMES: dict[Codec, tuple[str, ...]] = {
    Codec.H264: ("h264",),
    Codec.VP8: ("vp8", "libvpx"),
    Codec.VP9: ("vp9", "libvpx-vp9"),
    Codec.AV1: ("libdav1d", "av1", "libaom-av1"),
    Codec.OPUS: ("opus", "libopus"),
    Codec.PCMU: ("pcm_mulaw",),
    Codec.PCMA: ("pcm_alaw",),
    Codec.G722: ("g722",),
}
ENCODER_NAMES: dict[Codec, str] = {
    Codec.H264: "libx264",
    Codec.VP8: "libvpx",
    Codec.VP9: "libvpx-vp9",
    Codec.OPUS: "libopus",
    Codec.PCMU: "pcm_mulaw",
    Codec.PCMA: "pcm_alaw",
    Codec.G722: "g722",
}

# Sample rate the codec itself runs at.
SAMPLE_RATE_HZ: dict[Codec, int] = {Codec.OPUS: 48_000, Codec.PCMU: 8_000, Codec.PCMA: 8_000, Codec.G722: 16_000}
# RTP clock rate: G.722 keeps 8000 for historical reasons (RFC 3551 section 4.5.2) although it samples at 16 kHz.
RTP_CLOCK_HZ: dict[Codec, int] = {
    Codec.OPUS: 48_000,
    Codec.PCMU: 8_000,
    Codec.PCMA: 8_000,
    Codec.G722: 8_000,
    Codec.H264: VIDEO_CLOCK_HZ,
    Codec.VP8: VIDEO_CLOCK_HZ,
    Codec.VP9: VIDEO_CLOCK_HZ,
    Codec.AV1: VIDEO_CLOCK_HZ,
}
# Channels a decoder produces when nothing else is known: Opus is negotiated as 2 channels in SDP
# (RFC 7587) and a mono Opus stream decodes fine to two identical channels.
DEFAULT_CHANNELS: dict[Codec, int] = {Codec.OPUS: 2, Codec.PCMU: 1, Codec.PCMA: 1, Codec.G722: 1}

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
    """Whether an encoded payload starts a decodable picture, read from the bitstream itself.

    Used next to the packet's keyframe flag so a producer that does not set it still resynchronises.
    """
    view = memoryview(data).cast("B")
    if codec is Codec.VP8:
        # Frame tag bit 0 is 0 on key frames (RFC 6386 section 9.1).
        return len(view) >= 10 and view[0] & 0x01 == 0 and bytes(view[3:6]) == b"\x9d\x01\x2a"
    if codec is Codec.VP9:
        if not view:
            return False
        b = view[0]
        # frame_marker=2, then profile bits, show_existing_frame, frame_type (0 = key); profiles 0..2.
        return (b >> 6) == 2 and (b >> 4) & 0x3 != 3 and not (b >> 3) & 1 and not (b >> 2) & 1
    if codec is Codec.H264:
        return any(nal_type in (5, 7) for nal_type in h264_nal_types(view))
    return False


def h264_nal_types(view: memoryview) -> list[int]:
    """NAL unit types of an Annex B access unit (start codes 00 00 01 / 00 00 00 01)."""
    data = bytes(view)
    types = []
    start = data.find(b"\x00\x00\x01")
    while start != -1 and start + 3 < len(data):
        types.append(data[start + 3] & 0x1F)
        start = data.find(b"\x00\x00\x01", start + 3)
    return types


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
    samples = np.frombuffer(frame.data, dtype="<i2").reshape(1, frame.samples * frame.channels)
    out = av.AudioFrame.from_ndarray(samples, format="s16", layout=layout_name(frame.channels))
    out.sample_rate = frame.sample_rate
    return out


def av_to_s16(frame: av.AudioFrame) -> np.ndarray:
    """A packed-s16 ``av.AudioFrame`` to a flat interleaved int16 array."""
    if frame.format.name != "s16":
        raise ValueError(f"expected packed s16, got {frame.format.name}")
    return frame.to_ndarray().reshape(-1)


def make_audio_frame(header: MediaHeader, sample_rate: int, channels: int, samples: np.ndarray) -> AudioFrame:
    count = samples.size // channels
    return AudioFrame(header, sample_rate, channels, count, samples.astype("<i2", copy=False).tobytes())

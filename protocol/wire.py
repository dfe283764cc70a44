"""The sipbridge wire format: every message that crosses a ZeroMQ socket.

A message is a ZeroMQ multipart message. Part 0 is a binary header that always
starts with the 4-byte prefix ``b"SB" + version + kind``. Media kinds carry a
fixed-layout header and one payload part; control kinds carry one UTF-8 JSON
object as part 1. The layout is documented in ARCHITECTURE.md precisely enough
for a stage written in another language.

Nothing here does I/O: ``encode`` turns a message into a list of buffers and
``decode`` turns a list of buffers back into a message, validating everything
before building objects. Any malformed input raises ``ProtocolError``.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, TypeAlias

# Any object exposing the buffer protocol (bytes, memoryview, zmq frame buffer, C-contiguous numpy array).
# Typed loosely because numpy's stubs do not declare ndarray a Buffer on Python 3.11.
Payload: TypeAlias = Any

MAGIC = b"SB"
VERSION = 1

MAX_STREAM_ID_BYTES = 255
MAX_VIDEO_DIMENSION_PX = 8192
MAX_AUDIO_CHANNELS = 8
MAX_SAMPLE_RATE_HZ = 384_000
# Larger than any sane encoded frame or JSON body; guards against absurd lengths.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_CONTROL_BODY_BYTES = 1024 * 1024


class ProtocolError(ValueError):
    """A message that does not follow the wire format."""


class Kind(enum.IntEnum):
    VIDEO_FRAME = 1
    AUDIO_FRAME = 2
    ENCODED_PACKET = 3
    END_OF_STREAM = 16
    KEYFRAME_REQUEST = 17
    HEARTBEAT = 18
    ERROR = 19
    STATS = 20
    EVENT = 21


class PixelFormat(enum.IntEnum):
    I420 = 1


class SampleFormat(enum.IntEnum):
    S16 = 1  # signed 16-bit little-endian, channels interleaved


class Codec(enum.IntEnum):
    H264 = 1
    VP8 = 2
    VP9 = 3
    AV1 = 4
    OPUS = 16
    PCMU = 17
    PCMA = 18
    G722 = 19

    @property
    def is_video(self) -> bool:
        return self < Codec.OPUS


class EventType(enum.StrEnum):
    TRACK_ADDED = "track_added"
    TRACK_ENDED = "track_ended"
    PARTICIPANT_JOINED = "participant_joined"
    PARTICIPANT_LEFT = "participant_left"
    CALL_STATE = "call_state"
    DTMF = "dtmf"
    STAGE_STATE = "stage_state"


PREFIX = struct.Struct("<2sBB")
# seq, pts, time_base num, time_base den, capture_time_ns, stream id length
MEDIA_COMMON = struct.Struct("<QqIIqB")
VIDEO_FIELDS = struct.Struct("<BHH")  # pixel format, width, height
AUDIO_FIELDS = struct.Struct("<BIBI")  # sample format, sample rate, channels, samples
PACKET_FIELDS = struct.Struct("<BBq")  # codec, flags, dts
PACKET_FLAG_KEYFRAME = 0x01
PACKET_FLAG_HAS_DTS = 0x02
PACKET_KNOWN_FLAGS = PACKET_FLAG_KEYFRAME | PACKET_FLAG_HAS_DTS



@dataclass(frozen=True)
class MediaHeader:
    """Fields every media message carries."""

    stream_id: str
    seq: int
    pts: int
    time_base: Fraction
    # Wall-clock (CLOCK_REALTIME) nanoseconds when the content was captured at the
    # edge of the bridge; copied unchanged by every stage so latency is traceable.
    capture_time_ns: int


@dataclass(frozen=True)
class VideoFrame:
    header: MediaHeader
    width: int
    height: int
    data: Payload  # I420: Y plane, then U, then V, no padding
    pixel_format: PixelFormat = PixelFormat.I420


@dataclass(frozen=True)
class AudioFrame:
    header: MediaHeader
    sample_rate: int
    channels: int
    samples: int  # per channel
    data: Payload
    sample_format: SampleFormat = SampleFormat.S16


@dataclass(frozen=True)
class EncodedPacket:
    header: MediaHeader
    codec: Codec
    keyframe: bool
    data: Payload
    dts: int | None = None


@dataclass(frozen=True)
class EndOfStream:
    """No more media on ``stream_id``; an empty stream id means the producer is done."""

    stream_id: str = ""


@dataclass(frozen=True)
class KeyframeRequest:
    stream_id: str
    reason: str = ""


@dataclass(frozen=True)
class Heartbeat:
    stage: str
    time_ns: int
    pid: int = 0


@dataclass(frozen=True)
class ErrorReport:
    stage: str
    code: str
    message: str
    stream_id: str = ""
    call_id: str = ""


@dataclass(frozen=True)
class Stats:
    stage: str
    time_ns: int
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    type: EventType
    stream_id: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)


MediaMessage = VideoFrame | AudioFrame | EncodedPacket
ControlMessage = EndOfStream | KeyframeRequest | Heartbeat | ErrorReport | Stats | Event
Message = MediaMessage | ControlMessage


def i420_size(width: int, height: int) -> int:
    return width * height + 2 * ((width + 1) // 2) * ((height + 1) // 2)


def _check_media_header(h: MediaHeader) -> bytes:
    if not isinstance(h.stream_id, str):
        raise ProtocolError("stream_id must be a string")
    sid = h.stream_id.encode("utf-8")
    if not 0 < len(sid) <= MAX_STREAM_ID_BYTES:
        raise ProtocolError(f"stream_id must be 1..{MAX_STREAM_ID_BYTES} UTF-8 bytes")
    if not 0 <= h.seq < 2**64:
        raise ProtocolError("seq out of range")
    if not -(2**63) <= h.pts < 2**63:
        raise ProtocolError("pts out of range")
    tb = h.time_base
    if not isinstance(tb, Fraction) or tb <= 0 or tb.numerator >= 2**32 or tb.denominator >= 2**32:
        raise ProtocolError("time_base must be a positive fraction with 32-bit terms")
    if not 0 <= h.capture_time_ns < 2**63:
        raise ProtocolError("capture_time_ns out of range")
    return sid


def _common(kind: Kind, h: MediaHeader, sid: bytes) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, kind) + MEDIA_COMMON.pack(
        h.seq, h.pts, h.time_base.numerator, h.time_base.denominator, h.capture_time_ns, len(sid)
    )


def _nbytes(buf: Payload) -> int:
    return memoryview(buf).nbytes


def encode(msg: Message) -> list[Payload]:
    """Turn a message into the parts of one ZeroMQ multipart message."""
    if isinstance(msg, VideoFrame):
        sid = _check_media_header(msg.header)
        if not (0 < msg.width <= MAX_VIDEO_DIMENSION_PX and 0 < msg.height <= MAX_VIDEO_DIMENSION_PX):
            raise ProtocolError("video dimensions out of range")
        if _nbytes(msg.data) != i420_size(msg.width, msg.height):
            raise ProtocolError("video payload size does not match I420 dimensions")
        head = _common(Kind.VIDEO_FRAME, msg.header, sid)
        head += VIDEO_FIELDS.pack(msg.pixel_format, msg.width, msg.height) + sid
        return [head, msg.data]
    if isinstance(msg, AudioFrame):
        sid = _check_media_header(msg.header)
        _check_audio(msg.sample_rate, msg.channels, msg.samples, _nbytes(msg.data))
        head = _common(Kind.AUDIO_FRAME, msg.header, sid)
        head += AUDIO_FIELDS.pack(msg.sample_format, msg.sample_rate, msg.channels, msg.samples) + sid
        return [head, msg.data]
    if isinstance(msg, EncodedPacket):
        sid = _check_media_header(msg.header)
        if not 0 < _nbytes(msg.data) <= MAX_PAYLOAD_BYTES:
            raise ProtocolError("encoded payload must be 1..64 MiB")
        flags = PACKET_FLAG_KEYFRAME if msg.keyframe else 0
        dts = 0
        if msg.dts is not None:
            flags |= PACKET_FLAG_HAS_DTS
            dts = msg.dts
        head = _common(Kind.ENCODED_PACKET, msg.header, sid)
        head += PACKET_FIELDS.pack(Codec(msg.codec), flags, dts) + sid
        return [head, msg.data]
    kind, body = _control_body(msg)
    try:
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"control body is not JSON-serialisable: {exc}") from None
    if len(data) > MAX_CONTROL_BODY_BYTES:
        raise ProtocolError("control body too large")
    return [PREFIX.pack(MAGIC, VERSION, kind), data]


def _check_audio(rate: int, channels: int, samples: int, nbytes: int) -> None:
    if not 0 < rate <= MAX_SAMPLE_RATE_HZ:
        raise ProtocolError("sample rate out of range")
    if not 0 < channels <= MAX_AUDIO_CHANNELS:
        raise ProtocolError("channel count out of range")
    if not 0 < samples < 2**32 or nbytes != samples * channels * 2:
        raise ProtocolError("audio payload size does not match samples x channels x 2")


def _control_body(msg: Message) -> tuple[Kind, dict[str, Any]]:
    if isinstance(msg, EndOfStream):
        return Kind.END_OF_STREAM, {"stream_id": msg.stream_id}
    if isinstance(msg, KeyframeRequest):
        return Kind.KEYFRAME_REQUEST, {"stream_id": msg.stream_id, "reason": msg.reason}
    if isinstance(msg, Heartbeat):
        return Kind.HEARTBEAT, {"stage": msg.stage, "time_ns": msg.time_ns, "pid": msg.pid}
    if isinstance(msg, ErrorReport):
        return Kind.ERROR, {
            "stage": msg.stage,
            "code": msg.code,
            "message": msg.message,
            "stream_id": msg.stream_id,
            "call_id": msg.call_id,
        }
    if isinstance(msg, Stats):
        return Kind.STATS, {"stage": msg.stage, "time_ns": msg.time_ns, "figures": msg.figures}
    if isinstance(msg, Event):
        return Kind.EVENT, {
            "type": EventType(msg.type).value,
            "stream_id": msg.stream_id,
            "attributes": msg.attributes,
        }
    raise ProtocolError(f"not a sipbridge message: {type(msg).__name__}")


def decode(parts: Sequence[Payload]) -> Message:
    """Turn the parts of one ZeroMQ multipart message back into a message.

    Media payloads are returned as memoryviews of the received buffers, without copying.
    """
    if len(parts) != 2:
        raise ProtocolError(f"expected 2 message parts, got {len(parts)}")
    try:
        head = memoryview(parts[0]).cast("B")
        payload = memoryview(parts[1]).cast("B")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"message parts must be byte buffers: {exc}") from None
    if len(head) < PREFIX.size:
        raise ProtocolError("header shorter than the prefix")
    magic, version, kind_value = PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a sipbridge message")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
    try:
        kind = Kind(kind_value)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind_value}") from None
    if kind in (Kind.VIDEO_FRAME, Kind.AUDIO_FRAME, Kind.ENCODED_PACKET):
        return _decode_media(kind, head, payload)
    if len(head) != PREFIX.size:
        raise ProtocolError("control header has trailing bytes")
    return _decode_control(kind, payload)


_KIND_FIELDS = {
    Kind.VIDEO_FRAME: VIDEO_FIELDS,
    Kind.AUDIO_FRAME: AUDIO_FIELDS,
    Kind.ENCODED_PACKET: PACKET_FIELDS,
}


def _decode_media(kind: Kind, head: memoryview, payload: memoryview) -> MediaMessage:
    fields = _KIND_FIELDS[kind]
    fixed = PREFIX.size + MEDIA_COMMON.size + fields.size
    if len(head) < fixed:
        raise ProtocolError("media header truncated")
    seq, pts, tb_num, tb_den, capture_ns, sid_len = MEDIA_COMMON.unpack_from(head, PREFIX.size)
    if len(head) != fixed + sid_len:
        raise ProtocolError("media header length does not match its stream id length")
    if sid_len == 0:
        raise ProtocolError("empty stream id")
    if tb_num == 0 or tb_den == 0:
        raise ProtocolError("time base terms must be non-zero")
    if capture_ns < 0:
        raise ProtocolError("negative capture time")
    try:
        stream_id = bytes(head[fixed:]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("stream id is not valid UTF-8") from None
    header = MediaHeader(stream_id, seq, pts, Fraction(tb_num, tb_den), capture_ns)
    values = fields.unpack_from(head, PREFIX.size + MEDIA_COMMON.size)
    if kind is Kind.VIDEO_FRAME:
        fmt, width, height = values
        if fmt != PixelFormat.I420:
            raise ProtocolError(f"unknown pixel format {fmt}")
        if not (0 < width <= MAX_VIDEO_DIMENSION_PX and 0 < height <= MAX_VIDEO_DIMENSION_PX):
            raise ProtocolError("video dimensions out of range")
        if len(payload) != i420_size(width, height):
            raise ProtocolError(
                f"video payload is {len(payload)} bytes, {width}x{height} I420 needs {i420_size(width, height)}"
            )
        return VideoFrame(header, width, height, payload)
    if kind is Kind.AUDIO_FRAME:
        fmt, rate, channels, samples = values
        if fmt != SampleFormat.S16:
            raise ProtocolError(f"unknown sample format {fmt}")
        _check_audio(rate, channels, samples, len(payload))
        return AudioFrame(header, rate, channels, samples, payload)
    codec_value, flags, dts = values
    try:
        codec = Codec(codec_value)
    except ValueError:
        raise ProtocolError(f"unknown codec {codec_value}") from None
    if flags & ~PACKET_KNOWN_FLAGS:
        raise ProtocolError(f"unknown packet flags {flags:#x}")
    if not 0 < len(payload) <= MAX_PAYLOAD_BYTES:
        raise ProtocolError("encoded payload must be 1..64 MiB")
    return EncodedPacket(
        header,
        codec,
        bool(flags & PACKET_FLAG_KEYFRAME),
        payload,
        dts if flags & PACKET_FLAG_HAS_DTS else None,
    )


def _field(body: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    if name not in body:
        if default is ...:
            raise ProtocolError(f"control message lacks {name!r}")
        return default
    value = body[name]
    # bool is an int subclass in Python; a JSON true must not pass as a number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"control field {name!r} must be {kind.__name__}")
    return value


def _decode_control(kind: Kind, payload: memoryview) -> ControlMessage:
    if len(payload) > MAX_CONTROL_BODY_BYTES:
        raise ProtocolError("control body too large")
    try:
        body = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"control body is not UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("control body must be a JSON object")
    if kind is Kind.END_OF_STREAM:
        return EndOfStream(_field(body, "stream_id", str, ""))
    if kind is Kind.KEYFRAME_REQUEST:
        return KeyframeRequest(_field(body, "stream_id", str), _field(body, "reason", str, ""))
    if kind is Kind.HEARTBEAT:
        return Heartbeat(_field(body, "stage", str), _field(body, "time_ns", int), _field(body, "pid", int, 0))
    if kind is Kind.ERROR:
        return ErrorReport(
            _field(body, "stage", str),
            _field(body, "code", str),
            _field(body, "message", str),
            _field(body, "stream_id", str, ""),
            _field(body, "call_id", str, ""),
        )
    if kind is Kind.STATS:
        return Stats(_field(body, "stage", str), _field(body, "time_ns", int), _field(body, "figures", dict, {}))
    if kind is Kind.EVENT:
        type_name = _field(body, "type", str)
        try:
            event_type = EventType(type_name)
        except ValueError:
            raise ProtocolError(f"unknown event type {type_name!r}") from None
        return Event(event_type, _field(body, "stream_id", str, ""), _field(body, "attributes", dict, {}))
    raise ProtocolError(f"kind {kind.name} is not a control kind")  # pragma: no cover


def is_media(msg: Message) -> bool:
    return isinstance(msg, (VideoFrame, AudioFrame, EncodedPacket))

"""The wire format: golden bytes, round trips, and a fuzzer that must only ever see ProtocolError."""

from __future__ import annotations

import contextlib
import struct
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    AudioFrame,
    Codec,
    EncodedPacket,
    EndOfStream,
    ErrorReport,
    Event,
    EventType,
    Heartbeat,
    KeyframeRequest,
    MediaHeader,
    ProtocolError,
    Stats,
    VideoFrame,
)

GOLDEN_DIR = Path(__file__).parent / "golden"
HEADER = MediaHeader("cam-1", 7, 3003, Fraction(1, 90000), 1_700_000_000_123_456_789)


def sample_messages() -> dict[str, protocol.Message]:
    return {
        "video_i420_4x2": VideoFrame(HEADER, 4, 2, bytes(range(12))),
        "audio_s16_2x2": AudioFrame(
            MediaHeader("mic", 1, 960, Fraction(1, 48000), 5), 48000, 2, 2, b"\x01\x00\xff\xff\x00\x80\xff\x7f"
        ),
        "packet_h264_key": EncodedPacket(HEADER, Codec.H264, True, b"\x00\x00\x00\x01\x65\x88", dts=3000),
        "packet_pcmu": EncodedPacket(
            MediaHeader("sip-audio", 2, 160, Fraction(1, 8000), 9), Codec.PCMU, False, b"\xff" * 4
        ),
        "eos_all": EndOfStream(""),
        "keyframe_request": KeyframeRequest("cam-1", "decode error"),
        "heartbeat": Heartbeat("decoder", 42, 1234),
        "error": ErrorReport("decoder", "corrupt_packet", "bad NAL", "cam-1", "call-9"),
        "stats": Stats("encoder", 43, {"fps": 30.0}),
        "event_track": Event(EventType.TRACK_ADDED, "p1/video", {"participant": "alice", "kind": "video"}),
    }


def join(parts: list) -> bytes:
    """Golden file layout: for each part, a 4-byte little-endian length then the bytes."""
    return b"".join(struct.pack("<I", memoryview(p).nbytes) + bytes(p) for p in parts)


def split(blob: bytes) -> list[bytes]:
    parts, offset = [], 0
    while offset < len(blob):
        (size,) = struct.unpack_from("<I", blob, offset)
        parts.append(blob[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return parts


def same(a: protocol.Message, b: protocol.Message) -> bool:
    if hasattr(a, "data"):
        return (
            type(a) is type(b)
            and bytes(a.data) == bytes(b.data)
            and {k: v for k, v in vars(a).items() if k != "data"} == {k: v for k, v in vars(b).items() if k != "data"}
        )
    return a == b


@pytest.mark.parametrize("name", sorted(sample_messages()))
def test_golden_bytes_are_stable(name: str) -> None:
    """The bytes on the wire never change silently: other-language stages depend on them."""
    msg = sample_messages()[name]
    blob = join(protocol.encode(msg))
    golden = GOLDEN_DIR / f"{name}.bin"
    assert golden.exists(), f"missing golden file {golden}; generate with tests/golden/regenerate.py"
    assert blob == golden.read_bytes()
    assert same(protocol.decode(split(golden.read_bytes())), msg)


def test_video_header_layout_matches_architecture_doc() -> None:
    parts = protocol.encode(sample_messages()["video_i420_4x2"])
    head = bytes(parts[0])
    assert head[:4] == b"SB\x01\x01"
    seq, pts, num, den, capture, sid_len = struct.unpack_from("<QqIIqB", head, 4)
    assert (seq, pts, num, den, capture, sid_len) == (7, 3003, 1, 90000, 1_700_000_000_123_456_789, 5)
    assert struct.unpack_from("<BHH", head, 37) == (1, 4, 2)
    assert head[42:] == b"cam-1"


@pytest.mark.parametrize(
    "parts, reason",
    [
        ([b"XX\x01\x10", b"{}"], "magic"),
        ([b"SB\x02\x10", b"{}"], "version"),
        ([b"SB\x01\x63", b"{}"], "kind"),
        ([b"SB\x01\x10"], "parts"),
        ([b"SB\x01\x11", b"{}"], "stream_id"),
        ([b"SB\x01\x11", b"[1]"], "JSON object"),
        ([b"SB\x01\x12", b'{"stage":"x","time_ns":true}'], "time_ns"),
        ([b"SB\x01\x15", b'{"type":"nope"}'], "event type"),
        ([b"SB\x01\x10", b"\xff\xfe"], "UTF-8"),
        ([b"SB\x01\x01" + b"\x00" * 10, b""], "truncated"),
    ],
)
def test_malformed_inputs_raise_protocol_error(parts: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode(parts)


def test_wrong_video_payload_size_is_rejected_both_ways() -> None:
    bad = VideoFrame(HEADER, 4, 2, bytes(11))
    with pytest.raises(ProtocolError):
        protocol.encode(bad)
    good = protocol.encode(VideoFrame(HEADER, 4, 2, bytes(12)))
    with pytest.raises(ProtocolError, match="I420 needs 12"):
        protocol.decode([good[0], bytes(13)])


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


def test_decoded_payload_is_not_copied() -> None:
    payload = bytearray(12)
    head, _ = protocol.encode(VideoFrame(HEADER, 4, 2, bytes(12)))
    frame = protocol.decode([head, payload])
    payload[0] = 99
    assert isinstance(frame, VideoFrame) and memoryview(frame.data)[0] == 99


header_strategy = st.builds(
    MediaHeader,
    st.text(min_size=1, max_size=40).filter(lambda s: 0 < len(s.encode()) <= 255),
    st.integers(0, 2**64 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.fractions(min_value=Fraction(1, 2**31), max_value=2**31).filter(
        lambda f: f > 0 and f.numerator < 2**32 and f.denominator < 2**32
    ),
    st.integers(0, 2**63 - 1),
)


@st.composite
def media_messages(draw: st.DrawFn) -> protocol.Message:
    header = draw(header_strategy)
    which = draw(st.sampled_from(["video", "audio", "packet"]))
    if which == "video":
        w, h = draw(st.integers(1, 17)), draw(st.integers(1, 17))
        return VideoFrame(
            header, w, h, draw(st.binary(min_size=protocol.i420_size(w, h), max_size=protocol.i420_size(w, h)))
        )
    if which == "audio":
        ch, n = draw(st.integers(1, 8)), draw(st.integers(1, 64))
        return AudioFrame(
            header, draw(st.integers(1, 384000)), ch, n, draw(st.binary(min_size=n * ch * 2, max_size=n * ch * 2))
        )
    return EncodedPacket(
        header,
        draw(st.sampled_from(list(Codec))),
        draw(st.booleans()),
        draw(st.binary(min_size=1, max_size=64)),
        draw(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))),
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(media_messages())
def test_media_round_trip(msg: protocol.Message) -> None:
    assert same(protocol.decode(protocol.encode(msg)), msg)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(media_messages(), st.data())
def test_mutated_messages_only_raise_protocol_error(msg: protocol.Message, data: st.DataObject) -> None:
    parts = [bytearray(bytes(p)) for p in protocol.encode(msg)]
    part = data.draw(st.sampled_from(parts))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
        if op == "flip" and part:
            i = data.draw(st.integers(0, len(part) - 1))
            part[i] ^= data.draw(st.integers(1, 255))
        elif op == "truncate" and part:
            del part[data.draw(st.integers(0, len(part) - 1)) :]
        else:
            part.extend(data.draw(st.binary(max_size=8)))
    with contextlib.suppress(ProtocolError):
        protocol.decode(parts)


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=80), min_size=0, max_size=4))
def test_random_bytes_only_raise_protocol_error(parts: list[bytes]) -> None:
    with contextlib.suppress(ProtocolError):
        protocol.decode(parts)


@settings(max_examples=200)
@given(
    st.sampled_from([16, 17, 18, 19, 20, 21]),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=10,
    ),
)
def test_random_control_bodies_only_raise_protocol_error(kind: int, body: object) -> None:
    import json

    with contextlib.suppress(ProtocolError):
        protocol.decode([b"SB\x01" + bytes([kind]), json.dumps(body).encode()])

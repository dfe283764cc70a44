"""One codec registry (stages/codecs.py CODECS): every other codec table is derived from it and agrees with it,
with FFmpeg, with aiortc's SDP and with RFC 3551; no other source file spells the facts out again."""

from __future__ import annotations

import re
from pathlib import Path

import av
import pytest
from aiortc import RTCPeerConnection

import stages.janus as janus_stage
from protocol import Codec
from sipbridge import bridge
from sipbridge.testing import capture, demo
from stages import codecs, encoder
from stages.browser import stage as browser_stage
from stages.janus import media, sdp, sip

ROOT = Path(__file__).resolve().parents[1]
# RFC 3551 table 4: the static payload types of the audio codecs we carry, with their RTP clocks.
RFC3551 = {"PCMU": (0, 8000), "PCMA": (8, 8000), "G722": (9, 8000)}


def test_every_wire_codec_has_one_entry_and_names_are_unique() -> None:
    assert [i.codec for i in codecs.CODECS] == sorted(codecs.BY_CODEC, key=[i.codec for i in codecs.CODECS].index)
    assert set(codecs.BY_CODEC) == set(Codec)
    assert len(codecs.BY_NAME) == len(codecs.BY_RTP_NAME) == len(codecs.BY_MIME) == len(codecs.CODECS)
    for info in codecs.CODECS:
        assert codecs.codec_from_name(info.name) is info.codec
        assert info.mime.split("/")[0] == ("video" if info.is_video else "audio")
        assert info.mime.split("/")[1].upper() == info.rtp_name.upper()
        assert info.is_video == (info.sample_rate_hz is None) == (info.channels is None)
        assert info.is_video == (info.keyframe is not None) or info.codec is Codec.AV1


def test_static_payload_types_and_clocks_are_rfc_3551() -> None:
    assert {i.rtp_name: (i.payload_type, i.clock_hz) for i in codecs.CODECS if i.payload_type is not None} == RFC3551
    assert all(i.clock_hz == 90000 for i in codecs.CODECS if i.is_video)
    assert codecs.BY_NAME["g722"].sample_rate_hz == 16000 and codecs.BY_NAME["g722"].rtpmap == "G722/8000"
    assert codecs.BY_NAME["opus"].rtpmap == "opus/48000/2"


def test_ffmpeg_has_every_encoder_and_a_decoder_named() -> None:
    for info in codecs.CODECS:
        if info.encoder is not None:
            assert info.encoder in av.codecs_available, info
        assert any(name in av.codecs_available for name in info.decoders), info


def test_the_derived_tables_agree_with_the_registry() -> None:
    sip_codecs = [i for i in codecs.CODECS if i.sip]
    assert {i.codec: i.rtp_name.upper() for i in sip_codecs} == media.RTP_NAMES
    assert {v: k for k, v in media.CODEC_BY_RTP_NAME.items()} == media.RTP_NAMES
    assert {i.name: i.codec for i in sip_codecs} == janus_stage.CODEC_CHOICES
    assert {i.mime.lower(): i.codec for i in codecs.CODECS} == browser_stage.CODEC_BY_MIME
    assert {pt: sdp.STATIC_PAYLOAD_TYPES[pt] for pt in (0, 8, 9)} == {
        i.payload_type: (i.rtp_name, i.clock_hz) for i in codecs.CODECS if i.payload_type is not None
    }
    assert (*[i.name for i in sip_codecs if i.is_video], "none") == bridge.VIDEO_CODECS
    assert tuple(i.name for i in sip_codecs if not i.is_video) == bridge.AUDIO_CODECS
    assert bridge.CODEC_AUDIO_RATE_HZ == {"pcmu": 8000, "pcma": 8000, "g722": 16000, "opus": 48000}
    assert set(encoder.VIDEO_CODEC_CHOICES) | set(encoder.AUDIO_CODEC_CHOICES) == {
        i.name for i in codecs.CODECS if i.encoder
    }
    assert capture.STATIC_PAYLOAD_TYPES == {0: "PCMU", 8: "PCMA", 9: "G722"}
    assert capture.AUDIO_DECODERS == {"pcmu": ("pcm_mulaw", 8000), "pcma": ("pcm_alaw", 8000), "g722": ("g722", 16000)}
    assert demo.SDP_NAMES["opus"] == "OPUS" and demo.SDP_NAMES["h264"] == "H264"


async def _offer(kind: str, codec: Codec) -> str:
    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver(kind, direction="sendrecv")
        transceiver.setCodecPreferences(sip.codec_capabilities(kind, [codec]))
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


@pytest.mark.parametrize("info", [i for i in codecs.CODECS if i.sip], ids=lambda i: i.name)
def test_our_sdp_offer_says_what_the_registry_says(info: codecs.CodecInfo) -> None:
    """The janus stage's offer (aiortc, with the capabilities the registry picks) carries the registry's rtpmap,
    static payload type and fmtp."""
    import asyncio

    text = asyncio.run(_offer("video" if info.is_video else "audio", info.codec))
    section = next(m for m in sdp.SessionDescription.parse(text).media)
    (offered,) = section.codecs()
    assert f"{offered.name}/{offered.clock_rate}".upper() == "/".join(info.rtpmap.split("/")[:2]).upper()
    assert f"a=rtpmap:{offered.payload_type} {info.rtpmap}" in text
    if info.payload_type is not None:
        assert offered.payload_type == info.payload_type
    assert offered.fmtp == (sdp.parse_fmtp(info.fmtp) if info.fmtp else {})


def test_keyframe_detection_is_the_registry_s() -> None:
    vp8_key = bytes([0x10, 0x02, 0x00, 0x9D, 0x01, 0x2A, 0x40, 0x01, 0xF0, 0x00])
    assert codecs.is_keyframe_payload(Codec.VP8, vp8_key) and media.is_keyframe(Codec.VP8, vp8_key)
    assert not codecs.is_keyframe_payload(Codec.VP8, bytes([0x11]) + vp8_key[1:])
    idr = b"\x00\x00\x00\x01\x67\x42" + b"\x00\x00\x01\x65\x88"
    assert codecs.is_keyframe_payload(Codec.H264, idr) and media.is_keyframe(Codec.H264, idr)
    assert not codecs.is_keyframe_payload(Codec.H264, b"\x00\x00\x01\x41\x9a")
    assert media.is_keyframe(Codec.PCMU, b"\xff") and not codecs.is_keyframe_payload(Codec.PCMU, b"\xff")


# Facts that belong to the registry only: FFmpeg codec names, SDP encoding names with their clock, browser MIME
# types. (Literal expectations in tests, and SDP fixtures of other programs, are outside these folders.)
REPEATED_FACTS = re.compile(r"pcm_mulaw|pcm_alaw|libopus|libvpx-vp9|(?:PCMU|PCMA|G722)/8000|"
                            r"(?:video|audio)/(?:h264|vp8|vp9|av1|opus|pcmu|pcma|g722)\b", re.IGNORECASE)
ALLOWED = {"stages/codecs.py", "sipbridge/cluster/sipmsg.py", "sipbridge/room/cheap.py"}


def test_no_other_module_repeats_the_registry_s_facts() -> None:
    found = []
    for folder in ("stages", "sipbridge", "protocol"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            found += [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                      if REPEATED_FACTS.search(line)]
    assert not found, "\n".join(found)

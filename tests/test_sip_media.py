"""Media details on the SIP leg: audio-only peers that answer PCMA or G.722, keyframe requests in both
directions, hold and unhold. Real Janus, real sipp, a private namespace per test."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from pathlib import Path

import pytest

import protocol
from protocol import Codec, KeyframeRequest
from sipbridge.janus_server import JanusServer
from sipbridge.testing.rtcpecho import FMT_PLI, PSFB, feedback_formats
from tests.sipfix import (
    Capture,
    Sipp,
    janus_fixture,  # noqa: F401  (pytest fixture)
    netns_fixture,  # noqa: F401  (pytest fixture)
)
from tests.test_sip_control import PEER, SIPP_MEDIA_PORT, SIPP_PORT, Rig

pytestmark = [pytest.mark.media]


async def _audio_only(tmp_path: Path, janus: JanusServer, scenario: str, codec: Codec,
                     payload_type: int | None) -> None:
    # Offer PCMU and the peer's codec; the peer answers only its own.
    offer = ["--audio-codec", "pcmu", "--audio-codec", codec.name.lower(), "--video-codec", "none"]
    rig = Rig(tmp_path, janus, args=offer, video=None, audio=codec)
    capture = Capture(tmp_path / "sip.pcapng", [SIPP_MEDIA_PORT]).start()
    sipp = Sipp(scenario, tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]).start()
    try:
        await rig.stage.wait_registered()
        rig.feed(4.0)
        reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
        assert reply["ok"], reply
        assert reply["call"]["audio_codec"] == codec.name and reply["call"]["video_codec"] is None
        await rig.feeding  # type: ignore[misc]
        assert (await rig.stage.command({"cmd": "hangup"}))["ok"]
        assert sipp.wait(10) == 0
    finally:
        sipp.stop()
        capture.stop()
        await rig.close()
    assert rig.collector.audio_codecs == {codec}
    assert abs(rig.collector.tone_hz() - 440.0) < 10
    offer_sdp = sipp.messages()
    if payload_type is None:  # dynamic: the one our offer gave the codec
        payload_type = int(re.search(rf"a=rtpmap:(\d+) {codec.name.lower()}/", offer_sdp).group(1))  # type: ignore[union-attr]
    assert set(capture.rtp_payload_types(SIPP_MEDIA_PORT)) == {payload_type}
    assert "a=rtpmap:0 PCMU/8000" in offer_sdp and "m=video" not in offer_sdp


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("scenario", "codec", "payload_type"),
                         [("uas_pcma", Codec.PCMA, 8), ("uas_g722", Codec.G722, 9), ("uas_opus", Codec.OPUS, None)])
def test_audio_only_peer_codec(janus: JanusServer, tmp_path: Path, scenario: str, codec: Codec,
                               payload_type: int | None) -> None:
    asyncio.run(_audio_only(tmp_path, janus, scenario, codec, payload_type))


def _pli(sender_ssrc: int, media_ssrc: int) -> bytes:
    return struct.pack("!BBHII", 0x80 | FMT_PLI, PSFB, 2, sender_ssrc, media_ssrc)


def _rtcp_has_pli(data: bytes) -> bool:
    return FMT_PLI in feedback_formats(data)


async def _keyframes(tmp_path: Path, janus: JanusServer) -> None:
    # sipp does not listen on RTCP ports; stand in for the peer's video RTCP port (RTP + 1) ourselves, or Janus
    # gets ICMP and closes its RTCP socket (field notes).
    rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtcp.bind(("127.0.0.1", SIPP_MEDIA_PORT + 3))
    rtcp.setblocking(False)
    rig = Rig(tmp_path, janus)
    sipp = Sipp("uas_echo", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]).start()
    try:
        await rig.stage.wait_registered()
        rig.feed(8.0)
        reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
        assert reply["ok"], reply
        await rig.wait_state("media_up")
        await asyncio.sleep(1.0)  # past the stage's own keyframe request at call start
        janus_video_port = int(re.search(r"m=video (\d+) ", sipp.messages()).group(1))  # type: ignore[union-attr]
        before = len(rig.feeder.keyframe_requests)
        rtcp.sendto(_pli(0x1234, 0), ("127.0.0.1", janus_video_port + 1))
        deadline = time.monotonic() + 5
        while len(rig.feeder.keyframe_requests) == before and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        new: list[KeyframeRequest] = rig.feeder.keyframe_requests[before:]
        assert new and new[0].stream_id == "video0" and "SIP peer" in new[0].reason, new
        # The other way: our consumer lost its reference -> a PLI reaches the SIP peer.
        await rig.collector.control.send_multipart(
            protocol.encode(KeyframeRequest("sip-video", "test lost a frame")))
        got_pli = False
        deadline = time.monotonic() + 5
        while not got_pli and time.monotonic() < deadline:
            try:
                data = rtcp.recv(2048)
            except BlockingIOError:
                await asyncio.sleep(0.02)
                continue
            got_pli = _rtcp_has_pli(data)
        assert got_pli
        status = await rig.stage.command({"cmd": "status"})
        assert status["counters"]["plis_from_sip"] >= 1 and status["counters"]["plis_to_sip"] >= 1
        assert (await rig.stage.command({"cmd": "hangup"}))["ok"]
        assert sipp.wait(10) == 0
    finally:
        rtcp.close()
        sipp.stop()
        await rig.close()


@pytest.mark.timeout(60)
def test_keyframe_requests_both_ways(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_keyframes(tmp_path, janus))


async def _hold(tmp_path: Path, janus: JanusServer) -> None:
    rig = Rig(tmp_path, janus)
    sipp = Sipp("uas_hold", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]).start()
    try:
        await rig.stage.wait_registered()
        rig.feed(8.0)
        reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
        assert reply["ok"], reply
        await asyncio.sleep(0.5)
        assert (await rig.stage.command({"cmd": "hold"}))["ok"]
        await rig.wait_state("on_hold")
        await asyncio.sleep(0.5)
        assert (await rig.stage.command({"cmd": "unhold"}))["ok"]
        await rig.wait_state("resumed")
        frames_before = len(rig.collector.counters)
        await asyncio.sleep(1.0)
        assert len(rig.collector.counters) > frames_before  # media flows again after unhold
        assert (await rig.stage.command({"cmd": "hangup"}))["ok"]
        assert sipp.wait(10) == 0, sipp.output()
    finally:
        sipp.stop()
        await rig.close()
    # sipp's scenario checked the re-INVITEs (sendonly, then not); the trace shows the hold offer too.
    assert "a=sendonly" in sipp.messages()


@pytest.mark.timeout(60)
def test_hold_and_unhold(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_hold(tmp_path, janus))


async def _vp8_echo(tmp_path: Path, janus: JanusServer) -> None:
    rig = Rig(tmp_path, janus, args=["--video-codec", "vp8"], video=Codec.VP8)
    capture = Capture(tmp_path / "sip.pcapng", [SIPP_MEDIA_PORT + 2]).start()
    sipp = Sipp("uas_echo_vp8", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]).start()
    try:
        await rig.stage.wait_registered()
        rig.feed(4.0)
        reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
        assert reply["ok"], reply
        assert reply["call"]["video_codec"] == "VP8"
        await rig.feeding  # type: ignore[misc]
        assert (await rig.stage.command({"cmd": "hangup"}))["ok"]
        assert sipp.wait(10) == 0
    finally:
        sipp.stop()
        capture.stop()
        await rig.close()
    counters = rig.collector.counters
    assert len(counters) > 20 and counters == sorted(counters)
    assert rig.collector.video_codecs == {Codec.VP8}
    video_pt = int(re.search(r"a=rtpmap:(\d+) VP8/90000", sipp.messages()).group(1))  # type: ignore[union-attr]
    assert set(capture.rtp_payload_types(SIPP_MEDIA_PORT + 2)) == {video_pt}


@pytest.mark.timeout(60)
def test_vp8_echo(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_vp8_echo(tmp_path, janus))

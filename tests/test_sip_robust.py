"""The Janus stage under bad input and awkward peers: it counts, reports and keeps working."""

from __future__ import annotations

import asyncio
import os
import signal
from fractions import Fraction
from pathlib import Path

import pytest
import zmq

import protocol
from protocol import Codec, EncodedPacket, MediaHeader
from sipbridge.janus_server import JanusServer
from tests.sipfix import (
    Sipp,
    janus_fixture,  # noqa: F401  (pytest fixture)
    netns_fixture,  # noqa: F401  (pytest fixture)
    sip_listen_port,
)
from tests.test_sip_control import PEER, SIPP_MEDIA_PORT, SIPP_PORT, Rig

pytestmark = [pytest.mark.media]


async def _audio_only_phone(tmp_path: Path, janus: JanusServer) -> None:
    """A phone that rejects video (port 0): the call goes on with audio only."""
    rig = Rig(tmp_path, janus)
    sipp = Sipp("uas_novideo", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]).start()
    try:
        await rig.stage.wait_registered()
        rig.feed(4.0)
        reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
        assert reply["ok"], reply
        assert reply["call"]["audio_codec"] == "PCMU" and reply["call"]["video_codec"] is None
        await rig.feeding  # type: ignore[misc]
        assert (await rig.stage.command({"cmd": "hangup"}))["ok"]
        assert sipp.wait(10) == 0
        status = await rig.stage.command({"cmd": "status"})
        assert status["drops"].get("video_not_negotiated", 0) > 0
    finally:
        sipp.stop()
        await rig.close()
    assert abs(rig.collector.tone_hz() - 440.0) < 10
    assert not rig.collector.counters


@pytest.mark.timeout(60)
def test_peer_rejecting_video(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_audio_only_phone(tmp_path, janus))


async def _bad_input(tmp_path: Path, janus: JanusServer) -> None:
    rig = Rig(tmp_path, janus)
    try:
        await rig.stage.wait_registered()
        # Garbage on the data edge, a packet while no call is up, nonsense on the control socket.
        await rig.feeder.sock.send_multipart([b"not a sipbridge message"])
        await rig.feeder.sock.send_multipart([b"SB\x01\x03", b"truncated"])
        header = MediaHeader("video0", 0, 0, Fraction(1, 90000), 0)
        await rig.feeder.sock.send_multipart(protocol.encode(EncodedPacket(header, Codec.H264, True, b"\x00\x00\x01")))
        for request in [b"{not json", b"[1, 2]", b'{"cmd": "fly"}', b'{"cmd": "call", "uri": "http://x"}',
                        b'{"cmd": "hangup"}', b'{"cmd": "dtmf", "digits": "12"}']:
            req = rig.stage.ctx.socket(zmq.REQ)
            req.connect(rig.stage.control)
            await req.send(request)
            reply = await asyncio.wait_for(req.recv_json(), 5)
            req.close(linger=0)
            assert reply["ok"] is False and reply["error"], (request, reply)
        await asyncio.sleep(1.5)  # one statistics period
        status = await rig.stage.command({"cmd": "status"})
        assert status["drops"].get("malformed", 0) == 2 and status["drops"].get("no_call", 0) == 1
        # Still fully working: a call connects.
        with Sipp("uas_echo", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]) as sipp:
            rig.feed(3.0)
            reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
            assert reply["ok"], reply
            await rig.feeding  # type: ignore[misc]
            assert (await rig.stage.command({"cmd": "hangup"}))["ok"]
            assert sipp.wait(10) == 0
        assert len(rig.collector.counters) > 10
    finally:
        await rig.close()
    assert rig.exit_code == 0


@pytest.mark.timeout(60)
def test_bad_input_is_counted_and_the_stage_keeps_working(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_bad_input(tmp_path, janus))


MEDIA_TIMEOUT_S = 2.0
NEXT_PEER_PORT = 5092
NEXT_PEER_MEDIA_PORT = 6200
NEXT_PEER = f"sip:next@127.0.0.1:{NEXT_PEER_PORT}"


async def _vanished_peer(tmp_path: Path, janus: JanusServer) -> None:
    """A SIP peer that vanishes mid-call sends no BYE: after --media-timeout-s without media the stage hangs up,
    says why, and stays registered."""
    rig = Rig(tmp_path, janus, args=["--media-timeout-s", str(MEDIA_TIMEOUT_S)])
    try:
        await rig.stage.wait_registered()
        rig.feed(20.0)
        sipp = Sipp("uas_echo", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]).start()
        reply = await rig.stage.command({"cmd": "call", "uri": PEER, "wait": True})
        assert reply["ok"], reply
        await rig.wait_state("media_up")
        while len(rig.collector.counters) < 10:  # the echo flows
            await asyncio.sleep(0.1)
        assert sipp.proc is not None
        # Frozen, its sockets still open: like a peer whose host or network went away, no BYE and no ICMP
        # (a killed peer on this host makes the kernel answer with port-unreachable, which Janus acts on).
        os.killpg(sipp.proc.pid, signal.SIGSTOP)
        try:
            ended = await rig.wait_state("ended", timeout_s=MEDIA_TIMEOUT_S + 10)
        finally:
            os.killpg(sipp.proc.pid, signal.SIGKILL)
            sipp.stop()
        assert "no media from the SIP peer" in ended["reason"], ended
        status = await rig.stage.command({"cmd": "status"})
        assert status["errors"].get("media_timeout") == 1 and status["registration"]["state"] == "registered"
        # Janus keeps that SIP dialog until its BYE times out (64*T1 = 32 s) and the handle answers 447 until
        # then: the next call goes out at once on a fresh handle, and connects.
        with Sipp("uas_echo", tmp_path / "sipp2", NEXT_PEER_PORT, NEXT_PEER_MEDIA_PORT, extra=["-rtp_echo"]) as peer:
            mark = len(rig.collector.counters)
            reply = await rig.stage.command({"cmd": "call", "uri": NEXT_PEER, "wait": True})
            assert reply["ok"] and reply["call"]["state"] in ("accepted", "media_up"), reply
            while len(rig.collector.counters) < mark + 10:  # and carries media both ways
                await asyncio.sleep(0.1)
            assert (await rig.stage.command({"cmd": "hangup"}))["ok"]
            assert peer.wait(10) == 0, peer.output()
        status = await rig.stage.command({"cmd": "status"})
        assert status["counters"]["sip_handles"] == 2 and status["counters"]["calls_connected"] == 2
    finally:
        await rig.close()
    assert rig.exit_code == 0


@pytest.mark.timeout(120)
def test_vanished_peer_is_hung_up_after_the_media_timeout(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_vanished_peer(tmp_path, janus))


async def _vanished_caller(tmp_path: Path, janus: JanusServer) -> None:
    """An inbound caller vanishes mid-call: the media timeout hangs up, Janus's handle keeps retrying that BYE for
    32 s, and the next caller is still answered at once (by a helper handle) and carries media."""
    rig = Rig(tmp_path, janus, args=["--inbound", "--accept-from", "^sip:caller@", "--media-timeout-s",
                                     str(MEDIA_TIMEOUT_S)])
    try:
        await rig.stage.wait_registered()
        port = sip_listen_port()
        rig.feed(60.0)
        first = Sipp("uac_call", tmp_path / "caller1", SIPP_PORT, SIPP_MEDIA_PORT,
                     extra=["-rtp_echo", "-s", "bridge", "-d", "60000"], remote=f"127.0.0.1:{port}").start()
        try:
            await rig.wait_state("media_up")
            while len(rig.collector.counters) < 10:
                await asyncio.sleep(0.1)
            assert first.proc is not None
            os.killpg(first.proc.pid, signal.SIGSTOP)  # gone without a BYE
            ended = await rig.wait_state("ended", timeout_s=MEDIA_TIMEOUT_S + 10)
            assert "no media from the SIP peer" in ended["reason"], ended
            mark = rig.n_states()
            frames = len(rig.collector.counters)
            with Sipp("uac_call", tmp_path / "caller2", NEXT_PEER_PORT, NEXT_PEER_MEDIA_PORT,
                      extra=["-rtp_echo", "-s", "bridge", "-d", "4000"], remote=f"127.0.0.1:{port}") as second:
                accepted = await rig.wait_state("accepted", after=mark)
                assert accepted["peer"].startswith("sip:caller@127.0.0.1:5092"), accepted
                assert await asyncio.to_thread(second.wait, 30) == 0, second.output()
            assert "SIP/2.0 486" not in second.messages()  # a status line, not any "486" in a tag or branch
            assert len(rig.collector.counters) > frames + 10  # the second call's echo
        finally:
            if first.proc is not None:
                os.killpg(first.proc.pid, signal.SIGKILL)
            first.stop()
    finally:
        await rig.close()
    assert rig.exit_code == 0


@pytest.mark.timeout(120)
def test_next_caller_answered_while_a_vanished_callers_bye_is_retried(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_vanished_caller(tmp_path, janus))

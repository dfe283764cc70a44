"""SIP calls through the real Janus stage process, real Janus and real sipp, each in a private namespace."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest

from protocol import Codec
from sipbridge.janus_server import JanusServer
from tests.sipfix import (
    Capture,
    MediaCollector,
    MediaFeeder,
    Sipp,
    StageProcess,
    janus_fixture,  # noqa: F401  (pytest fixture)
    netns_fixture,  # noqa: F401  (pytest fixture)
    sip_listen_port,
    stop_stage_and_collector,
)

pytestmark = [pytest.mark.media]

SIPP_PORT = 5090
SIPP_MEDIA_PORT = 6000
TONE_HZ = 440.0


async def _echo_call(tmp_path: Path, janus: JanusServer) -> None:
    feed = f"ipc://{tmp_path}/feed.sock"
    feeder = MediaFeeder(feed, video=Codec.H264, audio=Codec.PCMU, tone_hz=TONE_HZ)
    stage = StageProcess(tmp_path / "stage", feed, janus.ws_url).start()
    collector = MediaCollector(stage.output)
    capture = Capture(tmp_path / "sip.pcapng", [SIPP_MEDIA_PORT, SIPP_MEDIA_PORT + 2]).start()
    sipp = Sipp("uas_echo", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]).start()
    collect = asyncio.create_task(collector.run())
    try:
        await stage.wait_registered()
        feeding = asyncio.create_task(feeder.run(6.0))
        reply = await stage.command({"cmd": "call", "uri": f"sip:echo@127.0.0.1:{SIPP_PORT}", "wait": True})
        assert reply["ok"], reply
        await feeding
        await asyncio.sleep(0.5)
        reply = await stage.command({"cmd": "hangup"})
        assert reply["ok"], reply
        assert sipp.wait(10) == 0, sipp.output()
        await asyncio.sleep(0.3)
    finally:
        capture.stop()
        sipp.stop()
        code = await stop_stage_and_collector(stage, collector, collect)
        print(stage.log_text()[-4000:])
        feeder.close()
    assert code == 0
    # Video came back through Janus and sipp: counters in order, none garbled, most of them there.
    counters = collector.counters
    assert len(counters) >= feeder.frames_sent * 0.5, (len(counters), feeder.frames_sent)
    assert counters == sorted(counters)
    assert collector.unreadable <= 2
    # Tone came back at its frequency.
    assert abs(collector.tone_hz() - TONE_HZ) < 10
    assert collector.video_codecs == {Codec.H264} and collector.audio_codecs == {Codec.PCMU}
    states = collector.states()
    assert "accepted" in states and states[-1] == "ended", states
    # On the SIP leg (what Janus sent to sipp): PCMU (PT 0) and H.264 with the offered payload type.
    audio_pts = capture.rtp_payload_types(SIPP_MEDIA_PORT)
    video_pts = capture.rtp_payload_types(SIPP_MEDIA_PORT + 2)
    assert set(audio_pts) == {0}, audio_pts
    offered = sipp.messages()
    assert len(video_pts) == 1, video_pts
    video_pt = next(iter(video_pts))
    assert f"a=rtpmap:{video_pt} H264/90000" in offered


@pytest.mark.timeout(90)
def test_echo_call_h264_pcmu(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_echo_call(tmp_path, janus))


async def _stop_mid_call(tmp_path: Path, janus: JanusServer) -> None:
    feed = f"ipc://{tmp_path}/feed.sock"
    feeder = MediaFeeder(feed, video=Codec.H264, audio=Codec.PCMU)
    stage = StageProcess(tmp_path / "stage", feed, janus.ws_url).start()
    collector = MediaCollector(stage.output)
    sipp = Sipp("uas_echo", tmp_path / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]).start()
    collect = asyncio.create_task(collector.run())
    try:
        await stage.wait_registered()
        feeding = asyncio.create_task(feeder.run(30.0))
        reply = await stage.command({"cmd": "call", "uri": f"sip:echo@127.0.0.1:{SIPP_PORT}", "wait": True})
        assert reply["ok"], reply
        while len(collector.counters) < 5:
            await asyncio.sleep(0.05)
        code = await stop_stage_and_collector(stage, collector, collect)  # SIGTERM mid-call
        feeding.cancel()
        assert sipp.wait(10) == 0, sipp.output()  # the peer got a BYE and answered it
    finally:
        sipp.stop()
        if stage.running():
            await stop_stage_and_collector(stage, collector, collect)
        feeder.close()
    log = stage.log_text()
    print(log[-3000:])
    assert code == 0
    ended = [e.attributes for e in collector.events if e.attributes.get("state") in ("ended", "janus_disconnected")]
    assert [e["state"] for e in ended] == ["ended"], ended
    assert ended[0]["call_id"] == reply["call"]["call_id"] and "stopping" in ended[0]["reason"]
    assert "janus_disconnected" not in log and " ERROR " not in log


@pytest.mark.timeout(60)
def test_stop_mid_call_is_a_clean_hangup(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_stop_mid_call(tmp_path, janus))


async def _softphone_calls_in(tmp_path: Path, janus: JanusServer) -> None:
    """The softphone's offer (two H.264 variants, H.263, MP4V-ES) answered with one variant, the first (PT 96) with
    its own mode-0 fmtp, and sent with PT 96 in single NAL unit packets: the echoed H.264 comes back to the stage
    and decodes. (Janus's SIP stack renumbers any other H.264 answer to the offer's first H.264 payload type.)"""
    feed = f"ipc://{tmp_path}/feed.sock"
    feeder = MediaFeeder(feed, video=Codec.H264, audio=Codec.PCMU, tone_hz=TONE_HZ)
    stage = StageProcess(tmp_path / "stage", feed, janus.ws_url,
                         args=["--inbound", "--accept-from", "^sip:caller@"]).start()
    collector = MediaCollector(stage.output)
    collect = asyncio.create_task(collector.run())
    capture: Capture | None = None
    try:
        await stage.wait_registered()
        port = sip_listen_port()
        capture = Capture(tmp_path / "sip.pcapng", [SIPP_MEDIA_PORT, SIPP_MEDIA_PORT + 2]).start()
        feeding = asyncio.create_task(feeder.run(30.0))
        with Sipp("uac_softphone", tmp_path / "phone", SIPP_PORT, SIPP_MEDIA_PORT,
                  extra=["-rtp_echo", "-s", "bridge", "-d", str(SOFTPHONE_CALL_MS)],
                  remote=f"127.0.0.1:{port}") as phone:
            code = await asyncio.to_thread(phone.wait, 60)
            assert code == 0, phone.output()
            answer = phone.messages().split("SIP/2.0 200 OK", 1)[1]
        feeder.stopped = True
        await feeding
    finally:
        if capture is not None:
            capture.stop()
        exit_code = await stop_stage_and_collector(stage, collector, collect)
        print(stage.log_text()[-4000:])
        feeder.close()
    assert exit_code == 0
    # The answer: one H.264 payload type, the offer's 96 with the offer's own fmtp; nothing of 97, 34, 98.
    video_line = re.search(r"m=video \d+ \S+ ([\d ]+)", answer)
    assert video_line is not None and video_line.group(1).split() == ["96"], answer
    assert re.search(r"a=fmtp:96 [^\r\n]*packetization-mode=0", answer), answer
    assert not re.search(r"a=(rtpmap|fmtp|rtcp-fb):(97|34|98)\b", answer), answer
    # On the wire: the bridge sent its video with that payload type, one NAL unit per packet (mode 0: no STAP-A;
    # parameter sets and slices as single NAL units, only a slice too big for a packet in FU-A), audio as PCMU.
    assert set(capture.rtp_payload_types(SIPP_MEDIA_PORT + 2)) == {96}
    nal_types = _rtp_nal_types(capture.path, SIPP_MEDIA_PORT + 2)
    assert 24 not in nal_types and {7, 8} <= nal_types, nal_types
    assert set(capture.rtp_payload_types(SIPP_MEDIA_PORT)) <= {0, 101}
    # And the phone's H.264 (here the echo of ours, under PT 97) reached the stage and decoded.
    assert collector.video_codecs == {Codec.H264}
    assert len(collector.counters) >= SOFTPHONE_MIN_FRAMES and collector.counters == sorted(collector.counters)
    assert abs(collector.tone_hz() - TONE_HZ) < 10


SOFTPHONE_CALL_MS = 10_000  # several of the feeder's 2 s keyframe intervals: a loaded machine may spoil one
SOFTPHONE_MIN_FRAMES = 10


@pytest.mark.timeout(120)
def test_softphone_offer_with_two_h264_variants(janus: JanusServer, tmp_path: Path) -> None:
    asyncio.run(_softphone_calls_in(tmp_path, janus))


def _rtp_nal_types(pcap: Path, port: int) -> set[int]:
    """H.264 NAL unit types (first payload byte) of the RTP packets sent to ``port``."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-d", f"udp.port=={port},rtp", "-Y", f"rtp && udp.dstport=={port}",
                          "-T", "fields", "-e", "rtp.payload"], capture_output=True, text=True, check=True).stdout
    return {int(line.replace(":", "")[:2], 16) & 0x1F for line in out.split() if line}


@pytest.mark.media
@pytest.mark.timeout(240)
def test_softphone_video_reaches_the_room(tmp_path: Path) -> None:
    """The softphone's offer end to end: the bridge answers it, the caller echoes, and the room's participant sees
    her own picture come back through the SIP leg (H.264 from the caller decoded by the bridge and shown as the
    bot's camera in the room)."""
    import time

    from sipbridge.status import StatusCollector
    from sipbridge.testing.localcall import BOT_NAME, SIP_PEER_MEDIA_PORT, SIP_PEER_PORT, sipp_scenario
    from tests.test_bridge_e2e import counters, need_media_tools
    from tests.test_bridge_inbound import (
        CALL_DURATION_MS,
        MEDIA_TIMEOUT_S,
        MIN_FRAMES,
        ROUTED_ROOM,
        InboundCall,
        InboundOptions,
        janus_sip_port,
        wait_figures,
    )

    need_media_tools()
    options = InboundOptions(participants=[("alice", 440.0)], room=ROUTED_ROOM, room_codec="h264", layout="single",
                             max_tiles=1, split=None)
    with InboundCall(tmp_path / "run", options) as call:
        collector = StatusCollector(call.run_dir)
        try:
            wait_figures(collector, "janus", lambda f: f["registration"].get("state") == "registered",
                         "the bridge registering")
            sipp_dir = call.run_dir / "sipp"
            sipp_dir.mkdir()
            caller = subprocess.Popen(
                ["sipp", "-sf", str(sipp_scenario("uac_softphone")), "-i", "127.0.0.1", "-p", str(SIP_PEER_PORT),
                 "-mi", "127.0.0.1", "-mp", str(SIP_PEER_MEDIA_PORT), "-m", "1", "-nostdin", "-rtp_echo",
                 "-s", "bridge", "-d", str(CALL_DURATION_MS), "-trace_msg", f"127.0.0.1:{janus_sip_port()}"],
                cwd=sipp_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_figures(collector, "browser", lambda f: f["state"] == "joined", "the bot joining")
                deadline = time.monotonic() + MEDIA_TIMEOUT_S
                while time.monotonic() < deadline and len(set(counters(call, "alice", BOT_NAME))) < MIN_FRAMES:
                    time.sleep(0.5)
                seen = counters(call, "alice", BOT_NAME)
                assert len(set(seen)) >= MIN_FRAMES, f"alice never saw the softphone's video: {seen[-10:]}"
                assert caller.wait(CALL_DURATION_MS / 1000 + 30) == 0, "the caller's call failed"
            finally:
                if caller.poll() is None:
                    caller.kill()
            messages = "".join(p.read_text(errors="replace") for p in sipp_dir.glob("*_messages.log"))
            answer = messages.split("SIP/2.0 200 OK", 1)[1]
            assert re.search(r"m=video \d+ \S+ 96\r?\n", answer) and "packetization-mode=0" in answer, answer
        finally:
            collector.close()

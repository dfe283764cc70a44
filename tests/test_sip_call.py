"""SIP calls through the real Janus stage process, real Janus and real sipp, each in a private namespace."""

from __future__ import annotations

import asyncio
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

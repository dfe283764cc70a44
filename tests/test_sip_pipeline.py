"""The issue's echo call with the real pipeline processes: source -> encoder (H.264 + PCMU) -> Janus stage ->
Janus -> sipp echo -> Janus -> Janus stage -> decoder -> sink, in a private namespace."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import zmq

from sipbridge.janus_server import JanusServer
from tests.sipfix import (
    Capture,
    Sipp,
    janus_fixture,  # noqa: F401  (pytest fixture)
    netns_fixture,  # noqa: F401  (pytest fixture)
)
from tests.stagehelp import SIPBRIDGE

pytestmark = [pytest.mark.media]

SIPP_PORT = 5090
SIPP_MEDIA_PORT = 6000
FPS = 15
FRAMES = 90  # 6 s
TONE_HZ = 440.0
# The raw-video edges may skip stale frames on a loaded 2-core machine; here every frame counts, so
# whatever goes missing was lost on the SIP leg.
LOSSLESS = ("--video-policy", "all")


def _start(run_dir: Path, kind: str, name: str, *args: str) -> subprocess.Popen[bytes]:
    log = open(run_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    env = {**os.environ, "SIPBRIDGE_RUN_DIR": str(run_dir)}
    return subprocess.Popen([*SIPBRIDGE, "stage", kind, "--name", name, *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def _control(endpoint: str, request: dict[str, object], timeout_s: float = 2.0) -> dict[str, object]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.connect(endpoint)
    try:
        sock.send_json(request)
        return sock.recv_json()  # type: ignore[return-value]
    finally:
        sock.close()


@pytest.mark.timeout(120)
def test_pipeline_echo_call(janus: JanusServer, tmp_path: Path) -> None:
    run = tmp_path
    ep = {name: f"ipc://{run}/{name}.sock" for name in ("source", "encoder", "janus", "decoder")}
    report = run / "sink.json"
    capture = Capture(run / "sip.pcapng", [SIPP_MEDIA_PORT, SIPP_MEDIA_PORT + 2]).start()
    sipp = Sipp("uas_echo", run / "sipp", SIPP_PORT, SIPP_MEDIA_PORT, extra=["-rtp_echo"]).start()
    procs = {
        "sink": _start(run, "sink", "sink", "--in", ep["decoder"], "--report", str(report),
                       *LOSSLESS),
        "decoder": _start(run, "decoder", "decoder", "--in", ep["janus"], "--out", ep["decoder"], *LOSSLESS),
        "janus": _start(run, "janus", "janus", "--in", ep["encoder"], "--out", ep["janus"], "--janus-url",
                        janus.ws_url, "--call", f"sip:echo@127.0.0.1:{SIPP_PORT}", "--audio-codec", "pcmu",
                        "--video-codec", "h264", *LOSSLESS),
        "encoder": _start(run, "encoder", "encoder", "--in", ep["source"], "--out", ep["encoder"],
                          "--video-codec", "h264", "--audio-codec", "pcmu", "--fps", str(FPS), *LOSSLESS),
    }
    try:
        # Start the picture once the call is up, so the sink sees the counter from its first frames.
        deadline = time.monotonic() + 30
        state = None
        while time.monotonic() < deadline:
            try:
                status = _control(f"ipc://{run}/janus.control", {"cmd": "status"})
            except zmq.Again:
                continue
            call = status.get("call") or {}
            state = call.get("state") if isinstance(call, dict) else None
            if state == "media_up":
                break
            time.sleep(0.1)
        assert state == "media_up", (run / "janus.log").read_text()[-3000:]
        procs["source"] = _start(run, "source", "source", "--out", ep["source"], "--width", "320", "--height",
                                 "240", "--fps", str(FPS), "--frames", str(FRAMES), "--tone-hz", str(TONE_HZ))
        # End of stream from the source stops every stage in turn; the Janus stage hangs up on its way out.
        for name in ("source", "encoder", "janus", "decoder", "sink"):
            code = procs[name].wait(30)
            assert code == 0, f"{name} exited {code}:\n{(run / f'{name}.log').read_text()[-3000:]}"
        assert sipp.wait(10) == 0, sipp.output()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        sipp.stop()
        capture.stop()
    summary = json.loads(report.read_text())
    video = summary["video"]["sip-video"]
    assert video["frames"] >= FRAMES * 0.6, video
    assert video["out_of_order"] == 0 and video["duplicates"] == 0 and video["unreadable"] == 0, video
    assert video["missing"] == 0, video
    audio = summary["audio"]["sip-audio"]
    assert abs(audio["frequency_hz"] - TONE_HZ) < 10, audio
    assert audio["sample_rate"] == 8000
    # On the SIP leg: PCMU (PT 0) for audio and H.264 under the payload type sipp answered.
    assert set(capture.rtp_payload_types(SIPP_MEDIA_PORT)) == {0}
    video_pts = capture.rtp_payload_types(SIPP_MEDIA_PORT + 2)
    assert len(video_pts) == 1 and f"a=rtpmap:{next(iter(video_pts))} H264/90000" in sipp.messages()

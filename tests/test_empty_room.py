"""An empty room still sends media to SIP, with the real components: the last participant leaves, and for 60 s the
SIP peer keeps receiving RTP (the slate and silence, read back from a capture of the SIP leg) and the call stays up,
so a carrier's RTP inactivity timer never fires and the phone user sees why nothing moves."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pytest

from sipbridge.status import StatusCollector
from sipbridge.testing.capture import audio_from_capture, h264_annexb
from sipbridge.testing.localcall import SIP_PEER_MEDIA_PORT, CallOptions, LocalCall, _stop, wait_until
from stages.pattern import dominant_frequency, read_counter
from stages.transformer import slate_i420

# About 100 s on a quiet machine (set-up, a minute of empty room, the capture read back); the harness allows minutes
# for the set-up on a loaded one (measured: 7 min at load average 100, the bridge 75 s behind).
pytestmark = [pytest.mark.media, pytest.mark.timeout(600)]

AUDIO_PORT, VIDEO_PORT = SIP_PEER_MEDIA_PORT, SIP_PEER_MEDIA_PORT + 2
ROOM = 4801
WIDTH, HEIGHT, FPS = 320, 240, 10
EMPTY_FOR_S = 60.0
MEDIA_TIMEOUT_S = 150.0
# A carrier's RTP inactivity timer is tens of seconds; no gap in what reaches the peer may come near it (a loaded
# 2-core machine can stall a stage for a second or two, never for this long).
MAX_GAP_S = 10.0
TAIL_S = 10.0  # the empty room's last seconds, where the slate and silence are judged
SLATE_MAX_MEAN_DIFF = 12.0  # luma, per pixel, against the slate rendered here (H.264 at 800 kb/s is close to it)
SILENCE_MAX_RMS = 50.0  # per packet: PCMU of digital silence decodes to +-8 at most
TONE_HZ = 440.0


def rtp_times(pcap: Path, port: int) -> list[float]:
    """Arrival times (epoch s) of the RTP packets sent to the SIP peer's ``port``."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-d", f"udp.port=={port},rtp", "-Y",
                          f"rtp && udp.dstport=={port}", "-T", "fields", "-e", "frame.time_epoch"],
                         capture_output=True, text=True, check=False).stdout
    return [float(line) for line in out.split() if line]


def h264_pictures(pcap: Path, port: int, since: float) -> list[tuple[float, np.ndarray]]:
    """(arrival time, luma) of each H.264 picture sent to the SIP peer, from ``since`` on (epoch s)."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-d", f"udp.port=={port},rtp", "-Y",
                          f"rtp && udp.dstport=={port}", "-T", "fields", "-e", "frame.time_epoch", "-e",
                          "rtp.marker", "-e", "rtp.payload"], capture_output=True, text=True, check=False).stdout
    decoder = av.CodecContext.create("h264", "r")
    pictures: list[tuple[float, np.ndarray]] = []
    access_unit = b""
    for line in out.splitlines():
        cols = line.split("\t")
        if len(cols) < 3 or not cols[2]:
            continue
        access_unit += h264_annexb(bytes.fromhex(cols[2].replace(":", "")))
        if cols[1] not in ("1", "True"):
            continue
        at = float(cols[0])
        try:
            frames = decoder.decode(av.Packet(access_unit))
        except av.error.InvalidDataError:
            frames = []
        access_unit = b""
        if at >= since:
            # The Y plane as sent (limited range), as slate_i420 draws it; "gray" would rescale it to full range.
            pictures += [(at, frame.to_ndarray(format="yuv420p")[: frame.height]) for frame in frames]
    return pictures


def call_state(call: LocalCall) -> dict:
    collector = StatusCollector(call.run_dir)
    try:
        collector.poll(1.5)
        return dict(collector.figures.get("janus", {}).get("call") or {})
    finally:
        collector.close()


def test_last_participant_leaves_and_the_sip_peer_keeps_getting_the_slate_and_silence(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("janus", "sipp", "tshark", "chromium"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    options = CallOptions(room=ROOM, participants=[("alice", TONE_HZ)], generators="aiortc", room_codec="h264",
                          width=WIDTH, height=HEIGHT, fps=FPS, bitrate_kbps=800, max_tiles=1, split=None)
    with LocalCall(tmp_path / "run", options) as call:
        # alice reaches the SIP side first (the bot has joined, the call is up, her picture and tone flow).
        wait_until(lambda: call_state(call).get("state") == "media_up", MEDIA_TIMEOUT_S, "the SIP call's media")
        wait_until(lambda: any(read_counter(y) for _, y in h264_pictures(call.pcap, VIDEO_PORT, 0.0)[-5:]),
                   MEDIA_TIMEOUT_S, "alice's picture at the SIP peer")
        # She leaves (with the browserless viewer: the room is empty but for the bot).
        _stop(call.procs["participants"])
        left = time.time()
        # The call must stay up the whole time; fail as soon as it does not.
        while time.time() < left + EMPTY_FOR_S:
            state = call_state(call)
            assert state.get("state") == "media_up" and not call.sipp_finished(), state
            time.sleep(5)
        final = call_state(call)
        assert final.get("state") == "media_up" and not final.get("ended_ns"), final
        assert not call.sipp_finished()
        logs = {name: call.stage_log(name, 12) for name in ("browser", "room-decoder", "room-transformer")}
        call.stop_bridge()  # hang up, so the capture holds everything
    window = (left, left + EMPTY_FOR_S)
    for port, what in ((AUDIO_PORT, "audio"), (VIDEO_PORT, "video")):
        times = [t for t in rtp_times(call.pcap, port) if window[0] <= t <= window[1]]
        assert len(times) >= EMPTY_FOR_S / 2, f"{what}: {len(times)} RTP packets in the empty room's 60 s"
        edges = [window[0], *times, window[1]]
        gap = max(b - a for a, b in pairwise(edges))
        assert gap < MAX_GAP_S, f"{what}: {gap:.1f} s without RTP to the SIP peer while the room was empty"
    # What the peer got by the end is the slate (its own rendering: "waiting for participants" and the room), not a
    # frozen picture of alice; the audio is silence, where before it was her tone. Judged over the window's last
    # seconds: on a loaded machine her last media and her stream's end can reach the SIP side many seconds late.
    tail = (left + EMPTY_FOR_S - TAIL_S, left + EMPTY_FOR_S)
    pictures = [y for t, y in h264_pictures(call.pcap, VIDEO_PORT, tail[0]) if t <= tail[1]]
    assert pictures, "no picture decoded in the empty room's last seconds"
    slate = slate_i420(WIDTH, HEIGHT, str(ROOM))[: WIDTH * HEIGHT].reshape(HEIGHT, WIDTH).astype(np.float64)
    differences = [float(np.abs(y.astype(np.float64) - slate).mean()) for y in pictures if y.shape == slate.shape]
    assert differences and min(differences) < SLATE_MAX_MEAN_DIFF, (
        differences[-5:], [float(y.mean()) for y in pictures[-3:]], logs)
    samples, rate = audio_from_capture(call.pcap, AUDIO_PORT, "pcmu")
    times = rtp_times(call.pcap, AUDIO_PORT)
    per_packet = samples.size // max(1, len(times))

    def packets_between(start: float, end: float) -> list[np.ndarray]:
        return [samples[i * per_packet:(i + 1) * per_packet].astype(np.float64) for i, t in enumerate(times)
                if start <= t < end]

    before = np.concatenate(packets_between(left - 3, left) or [np.zeros(0)])
    assert before.size and abs(dominant_frequency(before.astype(np.int16), rate) - TONE_HZ) < 25
    # Most of it silence (a loaded machine may still deliver a late scrap of her audio in the tail).
    levels = [float(np.sqrt(np.mean(p**2))) for p in packets_between(*tail)]
    assert levels and float(np.median(levels)) < SILENCE_MAX_RMS, levels[:20]
